"""The tunables of a DHT node (:class:`DhtConfig`): Kademlia's k and alpha, lookup limits,
routing-table upkeep, record and provider lifetimes, and the stores' bounds."""

from __future__ import annotations

from dataclasses import dataclass, field

from .records import RecordPolicy

__all__ = ["DhtConfig"]


@dataclass
class DhtConfig:
    k: int = 20
    alpha: int = 3
    #: S/Kademlia disjoint paths: each peer is queried by at most one path; 1 = plain Kademlia
    disjoint_paths: int = 1
    #: a request unanswered this long stops holding one of the alpha slots (it may still answer)
    stall_timeout: float = 1.0
    #: drivers abandon a request after this long and report it failed
    request_timeout: float = 5.0
    max_lookup_requests: int = 300
    replacement_size: int = 8
    max_failures: int = 2
    #: a full bucket asks for at most one liveness ping of its least-recently-seen entry this often
    ping_interval: float = 30.0
    refresh_interval: float = 3600.0
    republish_interval: float = 3600.0
    provider_ttl: float = 24 * 3600.0
    max_provider_ttl: float = 48 * 3600.0
    reprovide_interval: float = 12 * 3600.0
    #: a node in server mode answers requests and enters others' routing tables; a client-mode
    #: node (behind a NAT, a driver) only asks
    server_mode: bool = True
    policy: RecordPolicy = field(default_factory=RecordPolicy)
    max_records: int = 100_000
    per_publisher_records: int = 1_000
    per_publisher_bytes: int = 16 * 1024 * 1024
    max_providers: int = 100_000
    max_providers_per_key: int = 64
    per_provider_keys: int = 10_000
