"""The tunables of a Bitswap fetch session (:class:`SessionConfig`), each with its reason."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SessionConfig"]


@dataclass
class SessionConfig:
    #: Most blocks in flight per peer (a peer's pipeline depth). Within it, a peer is sent about
    #: ``window_seconds`` of blocks at its measured delivery rate (at least ``min_window``; a peer
    #: of unknown rate gets ``min_window``): a contended seed, slow to each of its fetchers, then
    #: holds few blocks of each, and fetchers do not queue there blocks they could get elsewhere.
    window: int = 8
    min_window: int = 2
    window_seconds: float = 1.0
    #: A peer's delivery rate is sampled over at least this much time it spent busy for us.
    rate_period: float = 1.0
    #: Blocks per request (one stream); a request's timeout grows with its size.
    blocks_per_request: int = 4
    #: Peers asked want-block for the root manifest at once (the rest get want-have).
    manifest_fanout: int = 2
    #: Timeout of a request of n blocks: base + n * per_block.
    request_timeout_base: float = 5.0
    request_timeout_per_block: float = 5.0
    #: How often partial holders are asked again for their have-bitmaps, and how often providers
    #: are looked up again while no peer can serve a missing block.
    refresh_interval: float = 1.0
    provider_retry_interval: float = 2.0
    #: A peer that sent this many bad blocks is dropped from the session.
    max_bad_blocks: int = 2
    #: After a failed request (timeout, connection lost) a peer gets no new requests for
    #: backoff_base * 2**(failures-1) s, at most backoff_max; a success resets it. Failures alone
    #: never drop a peer: under load a live provider can time out, and one that died costs only
    #: the requests sent after each backoff (the end game covers their blocks).
    backoff_base: float = 0.25
    backoff_max: float = 4.0
    #: Blocks are fetched in a per-session random order (seeded by ``order_seed``, else by the
    #: session's own randomness) so that concurrent fetchers hold different blocks and can trade.
    random_order: bool = True
    order_seed: int | None = None
    #: End game: once every missing block is in flight, idle peers also ask for blocks still
    #: in flight elsewhere (the first copy wins), so a stalled provider cannot hold up the end.
    endgame: bool = True
    #: ... but only for blocks that are late: asked longer ago than twice the time their peer's
    #: measured rate makes them due, plus this slack (so a healthy end sends no block twice).
    endgame_slack: float = 0.25
    #: Swarm policy (rarest first at full holders): a full holder (a seed) is asked first for
    #: blocks no partial holder (a fellow fetcher) has, so that its upload, which every fetcher
    #: shares, goes to blocks the swarm lacks; blocks partial holders have go to them, and to a
    #: full holder only with the budget it has left after that.
    spare_full_holders: bool = True
    #: Ask partial holders for their PENDING bitmaps: a block a fellow fetcher has asked for is not
    #: asked of a full holder first either (it will soon be at the fellow fetcher).
    share_pending: bool = True
    #: A partial holder delivering to us below this fraction of our best peer's rate does not
    #: count as a source: its blocks may then be asked of full holders too.
    slow_source_fraction: float = 0.1
