"""The QUIC implementations the transport can drive, and what it needs from each.

The transport's shell (:mod:`.quic`, :mod:`.quic_conn`, :mod:`.quic_channel`) drives a sans-I/O
QUIC connection: datagrams in, events and datagrams out. Two libraries provide one, behind the
same interface (:class:`QuicEngine`):

* ``qh3`` (:mod:`.quic_qh3`, the default when installed): aioquic's API over a Rust packet core,
  about seven times less CPU per packet than aioquic's pure Python. Its core's CUBIC (no
  setting, no hook) reads random loss as congestion; on a path that loses packets at random the
  connection sends each datagram twice or three times (:mod:`.quic_redundancy`);
* ``aioquic`` (:mod:`.quic_aioquic`): the fallback, with the transport's own loss-tolerant
  congestion control and path MTU discovery past 1472 bytes.

Each backend module provides a :class:`QuicBackend` (configuration and connection factory; a
:class:`LibraryBackend`, which builds the configuration both libraries share) and a connection
class satisfying :class:`QuicEngine`. ``QuicConfig.backend`` picks one ("auto": qh3
when it imports, else aioquic); :func:`.quic_loader.load_backend` resolves the name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

from ..tls import ALPN_LIBP2P
from .quic_config import CONNECTION_ID_LENGTH

if TYPE_CHECKING:
    from ..tls import CertifiedKey
    from .quic_config import QuicConfig
    from .quic_pmtu import PmtuSearch

__all__ = [
    "EventTypes",
    "LibraryBackend",
    "QuicBackend",
    "QuicEngine",
    "check_pinned_version",
    "common_configuration",
    "connection_window",
    "pinned_version_check",
]

#: A library's configuration class.
C = TypeVar("C")


@dataclass(frozen=True, slots=True)
class EventTypes:
    """The event classes of one backend, which the connection shell dispatches on."""

    stream_data: type
    handshake_completed: type
    connection_id_issued: type
    connection_id_retired: type
    stream_reset: type
    stop_sending: type
    terminated: type

    @classmethod
    def of(cls, events: ModuleType) -> EventTypes:
        """The classes of a library's ``quic.events`` module (aioquic's names, kept by qh3)."""
        return cls(
            stream_data=events.StreamDataReceived,
            handshake_completed=events.HandshakeCompleted,
            connection_id_issued=events.ConnectionIdIssued,
            connection_id_retired=events.ConnectionIdRetired,
            stream_reset=events.StreamReset,
            stop_sending=events.StopSendingReceived,
            terminated=events.ConnectionTerminated,
        )


class QuicEngine(Protocol):
    """One sans-I/O QUIC connection, as the transport's connection shell drives it.

    The first group is aioquic's public API (qh3 shares it); the rest are the transport's
    additions, which each backend implements over its library's internals. Once the connection
    is closed, qh3 raises from the methods that queue frames (send_stream_data, reset_stream,
    stop_stream, send_ping) where aioquic ignores the call: callers treat either as closed."""

    events: EventTypes
    #: The backend's name ("qh3", "aioquic").
    backend: str
    host_cid: bytes

    def connect(self, addr: Any, now: float) -> None: ...
    def receive_datagram(self, data: bytes, addr: Any, now: float) -> None: ...
    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Any]]: ...
    def get_timer(self) -> float | None: ...
    def handle_timer(self, now: float) -> None: ...
    def next_event(self) -> Any: ...
    def close(
        self, error_code: int = ..., frame_type: int | None = ..., reason_phrase: str = ...
    ) -> None: ...
    def send_ping(self, uid: int) -> None: ...
    def get_next_available_stream_id(self, is_unidirectional: bool = False) -> int: ...
    def send_stream_data(self, stream_id: int, data: bytes, end_stream: bool = False) -> None: ...
    def reset_stream(self, stream_id: int, error_code: int) -> None: ...
    def stop_stream(self, stream_id: int, error_code: int) -> None: ...

    # -- the transport's additions ----------------------------------------------------------
    @property
    def smoothed_rtt(self) -> float | None: ...
    @property
    def max_datagram_size(self) -> int: ...
    def receive_datagrams(self, datagrams: list[bytes], addr: Any, now: float) -> None:
        """Datagrams that arrived together from one address (one call into the library)."""

    def active_path_addr(self) -> Any: ...
    def peer_certificate_der(self) -> bytes | None:
        """The peer's certificate (DER) from the handshake; None once dropped or before."""

    def drop_peer_certificate(self) -> None:
        """The certificate is checked: forget it and the TLS handshake's state."""

    def stream_buffered(self, stream_id: int) -> int:
        """Bytes written to the stream that still wait to be sent or acknowledged."""

    def unacked_total(self) -> int:
        """Bytes of any stream not yet acknowledged (0: a graceful close may proceed)."""

    def disable_pacing(self) -> None: ...
    def reset_datagram_size(self) -> None:
        """The path changed: back to the base datagram size."""

    def track_stream(self, stream_id: int) -> None:
        """A channel reads this stream: its receive window follows ``consumed``."""

    def untrack_stream(self, stream_id: int) -> None: ...
    def consumed(self, stream_id: int, total: int, n: int) -> None:
        """The application has read ``total`` bytes of the stream, ``n`` of them new."""

    def discard_stream_data(self, stream_id: int, n: int) -> None:
        """``n`` bytes arrived for a stream no channel reads (credit them back)."""

    def loss_stats(self) -> tuple[int, int] | None:
        """(packets declared lost, about how many were sent), where the library says."""

    def conceals_loss(self) -> bool:
        """Whether the connection sends copies of its datagrams (:mod:`.quic_redundancy`)."""


class QuicBackend(Protocol):
    """A QUIC library the transport can drive."""

    name: str
    #: The QUIC versions its connections speak (the endpoint answers others with version
    #: negotiation).
    supported_versions: tuple[int, ...]

    def configuration(
        self,
        *,
        is_client: bool,
        max_datagram_size: int,
        certified: CertifiedKey,
        config: QuicConfig,
    ) -> Any:
        """The library's configuration object, shared by connections alike."""

    def connection(
        self,
        *,
        configuration: Any,
        config: QuicConfig,
        original_dcid: bytes | None,
        retry_scid: bytes | None,
        pmtu: PmtuSearch | None,
    ) -> QuicEngine:
        """A new connection (a client before ``connect``, or a server for one Initial)."""


def check_pinned_version(library: str, installed: str, pinned: str) -> None:
    """Raise ImportError unless ``installed`` is the release of ``library`` that the backend
    module overriding its private internals (``quic_<library>.py``) was written against."""
    if installed != pinned:
        raise ImportError(
            f"latticaray's QUIC transport overrides private internals of {library} {pinned} "
            f"(latticaray/mesh/transport/quic_{library}.py) but {library} {installed} is "
            f"installed: install {library}=={pinned}, or re-read that module against "
            f"{library} {installed} and move its pin"
        )


def pinned_version_check(library: str, pinned: str) -> Callable[[str], None]:
    """``check(installed)``: :func:`check_pinned_version` of ``library`` against ``pinned``."""

    def check(installed: str) -> None:
        check_pinned_version(library, installed, pinned)

    check.__doc__ = f"Raise ImportError unless ``installed`` is {library} {pinned}."
    return check


def connection_window(config: QuicConfig) -> int:
    """The connection-wide receive window: at least one stream's."""
    return max(config.connection_receive_window, config.stream_receive_window)


def common_configuration(
    *, is_client: bool, max_datagram_size: int, config: QuicConfig
) -> dict[str, Any]:
    """The configuration fields both libraries name alike (aioquic's ``QuicConfiguration``
    keywords, which qh3 kept)."""
    return {
        "is_client": is_client,
        "alpn_protocols": [ALPN_LIBP2P],
        "verify_mode": 0,  # ssl.CERT_NONE: the libp2p certificate is checked by the transport
        "idle_timeout": config.idle_timeout,
        "max_datagram_size": max_datagram_size,
        "max_data": connection_window(config),
        "max_stream_data": config.stream_receive_window,
        "connection_id_length": CONNECTION_ID_LENGTH,
        "initial_rtt": config.initial_rtt,
        "server_name": None,
    }


class LibraryBackend(Generic[C]):
    """The configuration half of a :class:`QuicBackend`, alike for both libraries: the library's
    configuration class (aioquic's ``QuicConfiguration`` or qh3's) given the fields both name
    alike (:func:`common_configuration`) and those of :meth:`library_fields`; the QUIC versions
    are those the class supports. A backend adds ``name`` and ``connection``."""

    name: str
    supported_versions: tuple[int, ...]

    def __init__(self, configuration_class: Callable[..., C]) -> None:
        self._configuration_class = configuration_class
        versions = configuration_class().supported_versions  # type: ignore[attr-defined]
        self.supported_versions = tuple(versions)

    def configuration(
        self,
        *,
        is_client: bool,
        max_datagram_size: int,
        certified: CertifiedKey,
        config: QuicConfig,
    ) -> C:
        return self._configuration_class(
            **common_configuration(
                is_client=is_client, max_datagram_size=max_datagram_size, config=config
            ),
            **self.library_fields(certified, config),
        )

    def library_fields(self, certified: CertifiedKey, config: QuicConfig) -> dict[str, Any]:
        """The configuration fields of this library only (the certificate and key in its
        form, its own tuning)."""
        raise NotImplementedError
