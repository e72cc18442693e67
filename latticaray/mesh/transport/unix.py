"""Same-host transport over Unix domain sockets, mutually authenticated without TLS.

Two nodes on one machine skip TCP/IP and TLS: bytes on a Unix socket go from one process to the
other through the kernel only, so there is no network path on which anyone could read or alter
them, and the socket file lives in a 0700 run directory with mode 0600, so only the same user can
connect at all (the server also checks the connecting process's uid with SO_PEERCRED). What still
has to be proven is *which peer* is on the other end; both sides do that with their Ed25519 host
keys in a challenge-response bound to fresh nonces from both sides (docs/protocol/rpc.md)::

    client -> server : "LUX1" | client_nonce (32) | client PublicKey protobuf (36)
    server -> client : server_nonce (32) | server PublicKey protobuf (36) | sig_s (64)
    client -> server : sig_c (64)
    server -> client : 0x00 (accepted)

    T     = "latticaray-unix-auth:v1:" | client_nonce | server_nonce | client_pk | server_pk
    sig_s = Sign(server key, "server:" | T);  sig_c = Sign(client key, "client:" | T)

Each signature covers both nonces (no replay) and names its role (no reflection). Every read is
fixed-size and the handshake has a deadline. The result is a
:class:`~latticaray.mesh.transport.streamchannel.StreamChannel` carrying ``/latticaray/rpc/1``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import stat
import struct
import tempfile

from ..errors import HandshakeError, PeerIdMismatch, PeerUnreachable
from ..identity import KeyPair, PeerId, PeerIdError, decode_public_key_protobuf
from ..multiaddr import Multiaddr
from .streambase import OnChannel, StreamTransportBase
from .streamchannel import StreamChannel

__all__ = ["UnixTransport", "auth_transcript", "default_run_dir", "read_hello", "read_reply"]

log = logging.getLogger(__name__)

MAGIC = b"LUX1"
NONCE_LEN = 32
PUBKEY_PB_LEN = 36
SIG_LEN = 64
HELLO_LEN = len(MAGIC) + NONCE_LEN + PUBKEY_PB_LEN
REPLY_LEN = NONCE_LEN + PUBKEY_PB_LEN + SIG_LEN
TRANSCRIPT_CONTEXT = b"latticaray-unix-auth:v1:"
ACCEPTED = b"\x00"
#: sun_path is 108 bytes on Linux, including the terminating NUL.
MAX_SOCKET_PATH = 107


def default_run_dir() -> str:
    """``$XDG_RUNTIME_DIR/latticaray`` or ``<tmp>/latticaray-<uid>``."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base and os.path.isdir(base):
        return os.path.join(base, "latticaray")
    return os.path.join(tempfile.gettempdir(), f"latticaray-{os.getuid()}")


def _private_dir(path: str) -> None:
    os.makedirs(path, mode=0o700, exist_ok=True)
    info = os.stat(path)
    if info.st_uid != os.getuid():
        raise PermissionError(f"run directory {path} is owned by uid {info.st_uid}, not us")
    if stat.S_IMODE(info.st_mode) & 0o077:
        os.chmod(path, 0o700)


def _peer_from_pb(pb: bytes) -> PeerId:
    try:
        return PeerId.from_public_key(decode_public_key_protobuf(pb))
    except PeerIdError as exc:
        raise HandshakeError(f"unix handshake: unusable public key: {exc}") from None


def read_hello(hello: bytes) -> tuple[bytes, bytes, PeerId]:
    """The client's first message (``HELLO_LEN`` bytes): its nonce, key protobuf and peer ID."""
    if len(hello) != HELLO_LEN or hello[: len(MAGIC)] != MAGIC:
        raise HandshakeError("unix client did not speak the latticaray unix handshake")
    client_pk = hello[len(MAGIC) + NONCE_LEN :]
    return hello[len(MAGIC) : len(MAGIC) + NONCE_LEN], client_pk, _peer_from_pb(client_pk)


def read_reply(reply: bytes) -> tuple[bytes, bytes, bytes, PeerId]:
    """The server's answer (``REPLY_LEN`` bytes): its nonce, key protobuf, signature, peer ID."""
    if len(reply) != REPLY_LEN:
        raise HandshakeError(f"unix server reply of {len(reply)} bytes, not {REPLY_LEN}")
    server_pk = reply[NONCE_LEN : NONCE_LEN + PUBKEY_PB_LEN]
    sig_s = reply[NONCE_LEN + PUBKEY_PB_LEN :]
    return reply[:NONCE_LEN], server_pk, sig_s, _peer_from_pb(server_pk)


def auth_transcript(
    client_nonce: bytes, server_nonce: bytes, client_pk: bytes, server_pk: bytes
) -> bytes:
    return TRANSCRIPT_CONTEXT + client_nonce + server_nonce + client_pk + server_pk


def _peer_uid(sock: socket.socket | None) -> int | None:
    if sock is None or not hasattr(socket, "SO_PEERCRED"):
        return None
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


class UnixTransport(StreamTransportBase):
    """Listen on and dial Unix domain sockets; each connection yields one authenticated channel."""

    name = "unix"

    def __init__(
        self,
        key: KeyPair,
        *,
        run_dir: str | None = None,
        handshake_timeout: float = 10.0,
        write_high_water: int = 1024 * 1024,
        read_high_water: int = 4 * 1024 * 1024,
        max_pending_handshakes: int = 256,
        same_uid_only: bool = True,
    ) -> None:
        super().__init__(
            key,
            handshake_timeout=handshake_timeout,
            write_high_water=write_high_water,
            read_high_water=read_high_water,
            max_pending_handshakes=max_pending_handshakes,
        )
        self.run_dir = run_dir if run_dir is not None else default_run_dir()
        self.same_uid_only = same_uid_only
        self._public_pb = key.peer_id.public_key_protobuf
        self._path: str | None = None

    @property
    def path(self) -> str | None:
        return self._path

    async def listen(
        self, path: str | None = None, on_channel: OnChannel | None = None
    ) -> Multiaddr:
        """Bind the socket (default: ``<run_dir>/<peer>.<pid>.sock``, mode 0600); returns
        ``/unix/<path>``."""
        if self._server is not None:
            raise RuntimeError("UnixTransport is already listening")
        if path is None:
            _private_dir(self.run_dir)
            path = os.path.join(self.run_dir, f"{str(self.peer_id)[-16:]}.{os.getpid()}.sock")
        path = os.path.abspath(path)
        if len(path.encode()) > MAX_SOCKET_PATH:
            raise ValueError(f"unix socket path is longer than {MAX_SOCKET_PATH} bytes: {path}")
        if os.path.lexists(path):
            if not stat.S_ISSOCK(os.lstat(path).st_mode):
                raise FileExistsError(f"{path} exists and is not a socket")
            os.unlink(path)  # stale socket of a previous run of this node
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)
        try:
            sock.bind(path)
        except OSError:
            sock.close()
            raise
        finally:
            os.umask(old_umask)
        os.chmod(path, 0o600)
        sock.setblocking(False)
        self._on_channel = on_channel
        self._path = path
        self._server = await asyncio.get_running_loop().create_unix_server(
            self._new_inbound, sock=sock, backlog=1024
        )
        self._listen_addr = Multiaddr([("unix", path)])
        return self._listen_addr

    def _new_inbound(self) -> StreamChannel:
        channel = super()._new_inbound()
        channel.remote_addr = self._listen_addr
        return channel

    async def _server_handshake(self, channel: StreamChannel) -> None:
        await channel.wait_connected()
        if self.same_uid_only:
            uid = _peer_uid(channel.get_extra_info("socket"))
            if uid is not None and uid != os.getuid():
                raise HandshakeError(f"unix client runs as uid {uid}, not ours")
        client_nonce, client_pk, client = read_hello(await channel.read_exactly(HELLO_LEN))
        server_nonce = os.urandom(NONCE_LEN)
        transcript = auth_transcript(client_nonce, server_nonce, client_pk, self._public_pb)
        channel.write(server_nonce + self._public_pb + self.key.sign(b"server:" + transcript))
        sig_c = await channel.read_exactly(SIG_LEN)
        if not client.verify(sig_c, b"client:" + transcript):
            raise HandshakeError(f"unix client {client} failed to prove its key")
        channel.remote_peer = client
        channel.write(ACCEPTED)

    async def dial(
        self, path: str, expected_peer: PeerId | None = None, *, timeout: float | None = None
    ) -> StreamChannel:
        """Connect to a node's socket and authenticate both ways; returns the channel."""
        loop = asyncio.get_running_loop()
        deadline = timeout if timeout is not None else self.handshake_timeout
        channel = self._new_channel()
        try:
            channel.remote_addr = Multiaddr([("unix", os.path.abspath(path))])
        except Exception as exc:
            raise PeerUnreachable(f"bad unix socket path {path!r}: {exc}") from None

        async def connect() -> None:
            await loop.create_unix_connection(lambda: channel, path)
            await self._client_handshake(channel, expected_peer)

        return await self._establish(channel, connect, path, deadline)

    async def _client_handshake(self, channel: StreamChannel, expected: PeerId | None) -> None:
        client_nonce = os.urandom(NONCE_LEN)
        channel.write(MAGIC + client_nonce + self._public_pb)
        server_nonce, server_pk, sig_s, server = read_reply(await channel.read_exactly(REPLY_LEN))
        transcript = auth_transcript(client_nonce, server_nonce, self._public_pb, server_pk)
        if not server.verify(sig_s, b"server:" + transcript):
            raise HandshakeError(f"unix server {server} failed to prove its key")
        if expected is not None and server != expected:
            raise PeerIdMismatch(expected, server)
        channel.write(self.key.sign(b"client:" + transcript))
        if await channel.read_exactly(1) != ACCEPTED:
            raise HandshakeError(f"peer {server} refused our authentication")
        channel.remote_peer = server

    async def close(self) -> None:
        """Stop listening (removing the socket file) and close every channel."""
        if self._server is not None:
            self._server.close()
            self._server = None
        if self._path is not None:
            try:
                if stat.S_ISSOCK(os.lstat(self._path).st_mode):
                    os.unlink(self._path)
            except FileNotFoundError:
                pass
            self._path = None
        await super().close()
