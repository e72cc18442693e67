"""Multiaddr: self-describing network addresses, in string and multicodec binary form.

Supported protocols (multicodec code, value): ``ip4`` (0x04, 4 bytes), ``ip6`` (0x29, 16 bytes),
``dns``/``dns4``/``dns6`` (0x35/0x36/0x37, name), ``tcp`` (0x06, port), ``udp`` (0x0111, port),
``quic-v1`` (0x01cd, none), ``p2p`` (0x01a5, peer-ID multihash; ``/ipfs/`` is read as an alias),
``p2p-circuit`` (0x0122, none), ``unix`` (0x0190, path).

A unix path is written percent-encoded as one segment (``/unix/%2Ftmp%2Fnode.sock``) so that a
``/p2p/<id>`` can follow it; a plain ``/unix/tmp/node.sock`` is also accepted when it is the last
protocol (everything after ``/unix`` is then the path).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from urllib.parse import quote, unquote

from .errors import MultiaddrError
from .identity import PeerId, PeerIdError
from .varint import VarintError, decode_varint, encode_varint

__all__ = ["Multiaddr", "MultiaddrError"]

MAX_MULTIADDR_BYTES = 1024
MAX_NAME_LEN = 255
MAX_UNIX_PATH_LEN = 1024

# name -> (code, kind); kind is the value type
_PROTOCOLS: dict[str, tuple[int, str]] = {
    "ip4": (0x04, "ip4"),
    "tcp": (0x06, "port"),
    "udp": (0x0111, "port"),
    "ip6": (0x29, "ip6"),
    "dns": (0x35, "name"),
    "dns4": (0x36, "name"),
    "dns6": (0x37, "name"),
    "quic-v1": (0x01CD, "none"),
    "p2p": (0x01A5, "peer"),
    "p2p-circuit": (0x0122, "none"),
    "unix": (0x0190, "path"),
}
_ALIASES = {"ipfs": "p2p"}
_BY_CODE = {code: name for name, (code, _) in _PROTOCOLS.items()}


def _decode_varint(data: bytes, offset: int) -> tuple[int, int]:
    try:
        return decode_varint(data, offset)
    except VarintError as exc:
        raise MultiaddrError(str(exc)) from None


def _parse_value(name: str, kind: str, text: str) -> object:
    if kind == "ip4":
        try:
            return str(ipaddress.IPv4Address(text))
        except ValueError:
            raise MultiaddrError(f"/ip4/{text}: not an IPv4 address") from None
    if kind == "ip6":
        try:
            return str(ipaddress.IPv6Address(text))
        except ValueError:
            raise MultiaddrError(f"/ip6/{text}: not an IPv6 address") from None
    if kind == "port":
        if not text.isdigit() or len(text) > 5:
            raise MultiaddrError(f"/{name}/{text}: port must be a decimal number 0-65535")
        port = int(text)
        if port > 65535:
            raise MultiaddrError(f"/{name}/{text}: port {port} is out of range 0-65535")
        return port
    if kind == "name":
        if not text or len(text) > MAX_NAME_LEN or "\x00" in text:
            raise MultiaddrError(f"/{name}/{text}: host name must be 1-{MAX_NAME_LEN} characters")
        return text
    if kind == "peer":
        try:
            return PeerId.from_string(text)
        except PeerIdError as exc:
            raise MultiaddrError(f"/p2p/{text}: {exc}") from None
    if kind == "path":
        try:
            path = unquote(text, errors="strict")
        except UnicodeDecodeError:
            raise MultiaddrError(f"/unix/{text}: percent-encoding is not UTF-8") from None
        _check_unix_path(path)
        return path
    raise AssertionError(kind)


def _check_unix_path(path: str) -> None:
    if not path.startswith("/") or len(path) > MAX_UNIX_PATH_LEN or "\x00" in path:
        raise MultiaddrError(
            f"/unix/{path!r}: path must be absolute, without NUL, at most {MAX_UNIX_PATH_LEN} chars"
        )


def _value_bytes(name: str, kind: str, value: object) -> bytes:
    if kind == "ip4":
        return ipaddress.IPv4Address(value).packed
    if kind == "ip6":
        return ipaddress.IPv6Address(value).packed
    if kind == "port":
        return int(value).to_bytes(2, "big")  # type: ignore[call-overload]
    if kind == "none":
        return b""
    if kind == "peer":
        raw = value.to_bytes()  # type: ignore[attr-defined]
    else:
        raw = str(value).encode("utf-8")
    return encode_varint(len(raw)) + raw


def _value_text(kind: str, value: object) -> str:
    if kind == "path":
        return quote(str(value), safe="")
    return str(value)


class Multiaddr:
    """An immutable, hashable multiaddr made of ``(protocol, value)`` components.

    Values are normalised: IP addresses as canonical strings, ports as ``int``, ``p2p`` as
    :class:`PeerId`, unix paths as ``str``, and ``None`` for protocols without a value.
    """

    __slots__ = ("_components", "_hash")

    def __init__(self, components: Iterable[tuple[str, object]]) -> None:
        comps = tuple((name, value) for name, value in components)
        for name, _ in comps:
            if name not in _PROTOCOLS:
                raise MultiaddrError(f"unsupported multiaddr protocol {name!r}")
        self._components = comps
        self._hash = hash(comps)

    @classmethod
    def parse(cls, text: str | Multiaddr) -> Multiaddr:
        if isinstance(text, Multiaddr):
            return text
        if not isinstance(text, str):
            raise MultiaddrError(f"multiaddr must be a str, got {type(text).__name__}")
        if len(text) > 4 * MAX_MULTIADDR_BYTES:
            raise MultiaddrError(f"multiaddr string is {len(text)} characters, too long")
        if not text.startswith("/"):
            raise MultiaddrError(f"multiaddr {text!r} must start with '/'")
        parts = text.split("/")[1:]
        if parts and parts[-1] == "" and len(parts) > 1:
            parts = parts[:-1]  # tolerate one trailing slash
        components: list[tuple[str, object]] = []
        i = 0
        while i < len(parts):
            raw_name = parts[i]
            name = _ALIASES.get(raw_name, raw_name)
            if name == "":
                raise MultiaddrError(f"multiaddr {text!r} has an empty protocol name")
            if name not in _PROTOCOLS:
                raise MultiaddrError(f"multiaddr {text!r}: unknown protocol {raw_name!r}")
            _, kind = _PROTOCOLS[name]
            i += 1
            if kind == "none":
                components.append((name, None))
                continue
            if i >= len(parts):
                raise MultiaddrError(f"multiaddr {text!r}: /{raw_name} needs a value")
            if kind == "path" and "%" not in parts[i] and i + 1 < len(parts):
                nxt = parts[i + 1]
                if nxt not in _PROTOCOLS and nxt not in _ALIASES:
                    # legacy unencoded form: the rest of the string is the path
                    value = "/" + "/".join(parts[i:])
                    components.append((name, _parse_value(name, kind, quote(value, safe=""))))
                    i = len(parts)
                    continue
            value_text = parts[i]
            if kind == "path" and "%" not in value_text and not value_text.startswith("/"):
                value_text = "/" + value_text
            components.append((name, _parse_value(name, kind, value_text)))
            i += 1
        if not components:
            raise MultiaddrError("multiaddr is empty")
        return cls(components)

    @classmethod
    def from_bytes(cls, data: bytes) -> Multiaddr:
        data = bytes(data)
        if len(data) > MAX_MULTIADDR_BYTES:
            raise MultiaddrError(
                f"binary multiaddr is {len(data)} bytes, over {MAX_MULTIADDR_BYTES}"
            )
        if not data:
            raise MultiaddrError("binary multiaddr is empty")
        components: list[tuple[str, object]] = []
        offset = 0
        while offset < len(data):
            code, offset = _decode_varint(data, offset)
            name = _BY_CODE.get(code)
            if name is None:
                raise MultiaddrError(f"unknown multiaddr protocol code 0x{code:x}")
            _, kind = _PROTOCOLS[name]
            if kind == "none":
                components.append((name, None))
                continue
            fixed = {"ip4": 4, "ip6": 16, "port": 2}.get(kind)
            if fixed is not None:
                chunk = data[offset : offset + fixed]
                if len(chunk) != fixed:
                    raise MultiaddrError(f"/{name} value truncated: need {fixed} bytes")
                offset += fixed
                if kind == "ip4":
                    value: object = str(ipaddress.IPv4Address(chunk))
                elif kind == "ip6":
                    value = str(ipaddress.IPv6Address(chunk))
                else:
                    value = int.from_bytes(chunk, "big")
                components.append((name, value))
                continue
            length, offset = _decode_varint(data, offset)
            chunk = data[offset : offset + length]
            if len(chunk) != length:
                raise MultiaddrError(f"/{name} value truncated: declared {length} bytes")
            offset += length
            if kind == "peer":
                try:
                    value = PeerId.from_bytes(chunk)
                except PeerIdError as exc:
                    raise MultiaddrError(f"/p2p value: {exc}") from None
            else:
                try:
                    value = chunk.decode("utf-8")
                except UnicodeDecodeError:
                    raise MultiaddrError(f"/{name} value is not UTF-8") from None
                if kind == "path":
                    _check_unix_path(value)
                elif not value or len(value) > MAX_NAME_LEN or "/" in value or "\x00" in value:
                    raise MultiaddrError(
                        f"/{name} value must be a host name of 1-{MAX_NAME_LEN} chars"
                    )
            components.append((name, value))
        return cls(components)

    def to_bytes(self) -> bytes:
        out = bytearray()
        for name, value in self._components:
            code, kind = _PROTOCOLS[name]
            out += encode_varint(code)
            out += _value_bytes(name, kind, value)
        return bytes(out)

    def __str__(self) -> str:
        pieces = []
        for name, value in self._components:
            _, kind = _PROTOCOLS[name]
            pieces.append("/" + name)
            if kind != "none":
                pieces.append("/" + _value_text(kind, value))
        return "".join(pieces)

    def __repr__(self) -> str:
        return f"Multiaddr({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Multiaddr):
            return self._components == other._components
        return NotImplemented

    def __hash__(self) -> int:
        return self._hash

    def __reduce__(self):
        return (Multiaddr.parse, (str(self),))

    # -- accessors ---------------------------------------------------------------------------

    @property
    def components(self) -> tuple[tuple[str, object], ...]:
        return self._components

    def protocols(self) -> list[str]:
        return [name for name, _ in self._components]

    def value_of(self, name: str) -> object:
        """The value of the first component named ``name`` (``KeyError`` if absent)."""
        for comp_name, value in self._components:
            if comp_name == name:
                return value
        raise KeyError(name)

    def _circuit_index(self) -> int | None:
        for i, (name, _) in enumerate(self._components):
            if name == "p2p-circuit":
                return i
        return None

    @property
    def peer_id(self) -> PeerId | None:
        """The peer this address reaches: the last ``/p2p`` (after ``/p2p-circuit`` if relayed)."""
        circuit = self._circuit_index()
        last = self._components[-1]
        if last[0] == "p2p" and (circuit is None or circuit < len(self._components) - 1):
            return last[1]  # type: ignore[return-value]
        return None

    @property
    def relay_peer(self) -> PeerId | None:
        """For a circuit address, the relay's peer ID (the ``/p2p`` before ``/p2p-circuit``)."""
        circuit = self._circuit_index()
        if circuit is None or circuit == 0:
            return None
        name, value = self._components[circuit - 1]
        return value if name == "p2p" else None  # type: ignore[return-value]

    @property
    def relay_addr(self) -> Multiaddr | None:
        """For a circuit address, the address of the relay (everything before ``/p2p-circuit``)."""
        circuit = self._circuit_index()
        if circuit is None or circuit == 0:
            return None
        return Multiaddr(self._components[:circuit])

    @property
    def host(self) -> str | None:
        for name, value in self._components:
            if name in ("ip4", "ip6", "dns", "dns4", "dns6"):
                return value  # type: ignore[return-value]
        return None

    @property
    def port(self) -> int | None:
        for name, value in self._components:
            if name in ("tcp", "udp"):
                return value  # type: ignore[return-value]
        return None

    @property
    def unix_path(self) -> str | None:
        for name, value in self._components:
            if name == "unix":
                return value  # type: ignore[return-value]
        return None

    @property
    def transport(self) -> str | None:
        """``'circuit'``, ``'quic'``, ``'tcp'``, ``'unix'`` or ``None`` (e.g. a bare ``/p2p``)."""
        names = self.protocols()
        if "p2p-circuit" in names:
            return "circuit"
        if "udp" in names and "quic-v1" in names:
            return "quic"
        if "tcp" in names:
            return "tcp"
        if "unix" in names:
            return "unix"
        return None

    def without_peer(self) -> Multiaddr:
        """This address without a trailing ``/p2p/<id>`` (unchanged if there is none)."""
        if self._components and self._components[-1][0] == "p2p" and len(self._components) > 1:
            if self.peer_id is not None:
                return Multiaddr(self._components[:-1])
        return self

    def with_peer(self, peer: PeerId) -> Multiaddr:
        """This address ending in ``/p2p/<peer>`` (replacing a different trailing peer ID)."""
        if not isinstance(peer, PeerId):
            raise MultiaddrError(f"with_peer needs a PeerId, got {type(peer).__name__}")
        base = self.without_peer()
        return Multiaddr(base._components + (("p2p", peer),))

    def encapsulate(self, other: Multiaddr | str) -> Multiaddr:
        other = Multiaddr.parse(other)
        return Multiaddr(self._components + other._components)

    def is_loopback(self) -> bool:
        host = self.host
        if host is None:
            return self.transport == "unix"
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return host == "localhost"
