"""End-to-end secure channel over any byte stream (used for relayed connections).

Two peers connected through a relay run TLS 1.3 between *themselves* over the relayed byte
stream, with ``ssl.MemoryBIO``: the relay forwards only ciphertext and never holds a key. The
server presents its libp2p certificate (``latticaray.mesh.tls``) and the client checks that it
proves the peer ID it meant to reach; then the client proves its own identity in-band (the
server's fresh nonce signed together with the server's certificate, see docs/protocol/mesh.md).
The result is a :class:`~latticaray.mesh.channel.Channel`, so an ``RpcSession`` runs over it
like over any direct transport.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import ClassVar, Protocol

from ..errors import ConnectionClosed, HandshakeError, PeerIdMismatch
from ..identity import KeyPair, PeerId
from ..tls import (
    AUTH_NONCE_LEN,
    AUTH_PROOF_LEN,
    CertifiedKey,
    client_ssl_context,
    make_auth_proof,
    make_certified_key,
    new_auth_nonce,
    server_ssl_context,
    verify_auth_proof,
    verify_certificate,
)

READ_CHUNK = 65536
HANDSHAKE_TIMEOUT = 10.0


class ByteStream(Protocol):
    async def read(self, max_bytes: int) -> bytes: ...
    def write(self, data: bytes) -> None: ...
    async def drain(self) -> None: ...
    def close(self) -> None: ...


class StreamPair:
    """Adapts an asyncio (reader, writer) pair to the :class:`ByteStream` shape."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def read(self, max_bytes: int) -> bytes:
        return await self.reader.read(max_bytes)

    def write(self, data: bytes) -> None:
        if not self.writer.is_closing():
            self.writer.write(data)

    async def drain(self) -> None:
        try:
            await self.writer.drain()
        except (ConnectionError, OSError) as exc:
            raise ConnectionClosed(f"stream closed: {exc}") from None

    def close(self) -> None:
        self.writer.close()

    @property
    def is_closing(self) -> bool:
        return self.writer.is_closing()


class _Contexts:
    """Per-key cache: certificate generation and ssl contexts are not free."""

    _cache: ClassVar[dict[bytes, tuple[CertifiedKey, ssl.SSLContext, ssl.SSLContext]]] = {}

    @classmethod
    def get(cls, key: KeyPair) -> tuple[CertifiedKey, ssl.SSLContext, ssl.SSLContext]:
        entry = cls._cache.get(key.public_key_bytes)
        if entry is None:
            certified = make_certified_key(key)
            entry = (certified, server_ssl_context(certified), client_ssl_context(certified))
            if len(cls._cache) > 64:
                cls._cache.clear()
            cls._cache[key.public_key_bytes] = entry
        return entry


class SecureTunnel:
    """A TLS 1.3 session over an inner byte stream; satisfies the Channel contract."""

    def __init__(
        self,
        inner: ByteStream,
        sslobj: ssl.SSLObject,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
        local_peer: PeerId,
        transport: str,
    ) -> None:
        self.inner = inner
        self._ssl = sslobj
        self._in = incoming
        self._out = outgoing
        self.local_peer = local_peer
        self.remote_peer: PeerId | None = None
        self.remote_addr = None
        self.transport = transport
        self._closed = False
        self._eof = False
        self._read_lock = asyncio.Lock()

    @property
    def peer(self) -> PeerId:
        """The authenticated remote peer (raises :class:`HandshakeError` before the handshake)."""
        if self.remote_peer is None:
            raise HandshakeError("the tunnel's peer is not authenticated yet")
        return self.remote_peer

    # -- handshake ----------------------------------------------------------------------------
    @classmethod
    async def client(
        cls,
        inner: ByteStream,
        key: KeyPair,
        expected_peer: PeerId,
        transport: str = "relay",
        timeout: float = HANDSHAKE_TIMEOUT,
    ) -> SecureTunnel:
        _certified, _, ctx = _Contexts.get(key)
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tunnel = cls(
            inner,
            ctx.wrap_bio(incoming, outgoing, server_side=False),
            incoming,
            outgoing,
            key.peer_id,
            transport,
        )
        try:
            await asyncio.wait_for(tunnel._client_handshake(key, expected_peer), timeout)
        except TimeoutError:
            tunnel.abort()
            raise HandshakeError(
                f"secure tunnel handshake with {expected_peer} timed out"
            ) from None
        except BaseException:
            tunnel.abort()
            raise
        return tunnel

    @classmethod
    async def server(
        cls,
        inner: ByteStream,
        key: KeyPair,
        transport: str = "relay",
        timeout: float = HANDSHAKE_TIMEOUT,
    ) -> SecureTunnel:
        certified, ctx, _ = _Contexts.get(key)
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tunnel = cls(
            inner,
            ctx.wrap_bio(incoming, outgoing, server_side=True),
            incoming,
            outgoing,
            key.peer_id,
            transport,
        )
        try:
            await asyncio.wait_for(tunnel._server_handshake(certified), timeout)
        except TimeoutError:
            tunnel.abort()
            raise HandshakeError("secure tunnel handshake timed out") from None
        except BaseException:
            tunnel.abort()
            raise
        return tunnel

    async def _do_handshake(self) -> None:
        while True:
            try:
                self._ssl.do_handshake()
                self._flush()
                return
            except ssl.SSLWantReadError:
                self._flush()
                await self.inner.drain()
                data = await self.inner.read(READ_CHUNK)
                if not data:
                    raise HandshakeError(
                        "the stream closed during the secure tunnel handshake"
                    ) from None
                self._in.write(data)
            except ssl.SSLError as exc:
                raise HandshakeError(f"secure tunnel TLS handshake failed: {exc}") from None

    async def _client_handshake(self, key: KeyPair, expected_peer: PeerId) -> None:
        await self._do_handshake()
        server_cert = self._ssl.getpeercert(binary_form=True)
        if not server_cert:
            raise HandshakeError("the tunnel's server presented no certificate")
        peer = verify_certificate(server_cert)
        if peer != expected_peer:
            raise PeerIdMismatch(expected_peer, peer)
        self.remote_peer = peer
        nonce = await self._read_exact(AUTH_NONCE_LEN)
        self.write(make_auth_proof(key, server_cert, nonce))
        await self.drain()

    async def _server_handshake(self, certified: CertifiedKey) -> None:
        await self._do_handshake()
        nonce = new_auth_nonce()
        self.write(nonce)
        await self.drain()
        proof = await self._read_exact(AUTH_PROOF_LEN)
        self.remote_peer = verify_auth_proof(proof, certified.certificate_der, nonce)

    async def _read_exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = await self.read(n - len(buf))
            if not chunk:
                raise HandshakeError("the stream closed during tunnel authentication")
            buf += chunk
        return buf

    # -- Channel ------------------------------------------------------------------------------
    def _flush(self) -> None:
        pending = self._out.read()
        if pending:
            self.inner.write(pending)

    async def read(self, max_bytes: int) -> bytes:
        async with self._read_lock:
            while True:
                if self._closed:
                    return b""
                try:
                    data = self._ssl.read(max_bytes)
                    self._flush()
                    if not data:  # close_notify
                        self._eof = True
                    return data
                except ssl.SSLWantReadError:
                    self._flush()
                    if self._eof:
                        return b""
                    try:
                        chunk = await self.inner.read(READ_CHUNK)
                    except (ConnectionError, OSError):
                        chunk = b""
                    if not chunk:
                        self._eof = True
                        self._in.write_eof()
                        return b""
                    self._in.write(chunk)
                except ssl.SSLZeroReturnError:
                    self._eof = True
                    return b""
                except ssl.SSLError as exc:
                    self.abort()
                    raise ConnectionClosed(f"secure tunnel broke: {exc}") from None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closed:
            raise ConnectionClosed("secure tunnel is closed")
        view = memoryview(data)
        while view:  # SSLObject.write takes at most 16 KiB records at a time
            written = self._ssl.write(view[:65536])
            view = view[written:]
        self._flush()

    async def drain(self) -> None:
        if self._closed:
            raise ConnectionClosed("secure tunnel is closed")
        await self.inner.drain()

    def close(self) -> None:
        if self._closed:
            return
        try:
            self._ssl.unwrap()
        except (ssl.SSLError, ValueError):
            pass
        try:
            self._flush()
        except Exception:
            pass
        self._closed = True
        self.inner.close()

    def abort(self) -> None:
        self._closed = True
        self.inner.close()

    @property
    def is_closed(self) -> bool:
        return self._closed or self._eof
