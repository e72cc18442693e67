"""The fuzz targets: one per decoder that reads bytes a peer controls.

Each :class:`Target` names a function fed one fuzzer input, the exceptions that count as a clean
refusal (the decoder's own typed errors), and seed inputs built from valid encodings (the same
vectors the unit tests use), so the fuzzer starts from the interesting part of the input space.
Anything else a target raises is a crash; an input that runs past libFuzzer's ``-timeout`` is a
hang. The harness (:mod:`fuzz.run`) imports this module under atheris' instrumentation.
"""

from __future__ import annotations

import datetime as dt
import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import msgpack

from latticaray.mesh import framing, tls
from latticaray.mesh.dht import messages as dht_messages
from latticaray.mesh.dht.errors import DhtError
from latticaray.mesh.errors import MeshError
from latticaray.mesh.identify import IdentifyInfo
from latticaray.mesh.identity import KeyPair, PeerIdError, decode_public_key_protobuf
from latticaray.mesh.libp2p import bitswap as libp2p_bitswap
from latticaray.mesh.libp2p import dcutr, kad, peer_record, relay
from latticaray.mesh.libp2p.identify import IdentifyMessage
from latticaray.mesh.libp2p.keys import PrivateKey, PublicKey
from latticaray.mesh.libp2p.multistream import MultistreamCore, MultistreamRole, encode_message
from latticaray.mesh.libp2p.noise import NoiseCore, NoiseHandshakePayload, NoiseRole
from latticaray.mesh.libp2p.protobuf import LengthPrefixedDecoder, encode_length_prefixed
from latticaray.mesh.libp2p.yamux import HEADER as YAMUX_HEADER
from latticaray.mesh.libp2p.yamux import Flag as YamuxFlag
from latticaray.mesh.libp2p.yamux import FrameType as YamuxFrame
from latticaray.mesh.libp2p.yamux import YamuxCore
from latticaray.mesh.multiaddr import Multiaddr
from latticaray.mesh.nat import wire as nat_wire
from latticaray.mesh.nat.errors import NatError
from latticaray.mesh.transport import unix
from latticaray.objectstore import bitswap, dagcbor
from latticaray.objectstore.cid import DAG_CBOR, Cid
from latticaray.objectstore.errors import ObjectStoreError
from latticaray.objectstore.manifest import Manifest, build_manifest
from latticaray.runtime import meshdht
from latticaray.runtime.admission import (
    Credential,
    MeshKey,
    verify_credential,
    verify_revocation,
)
from latticaray.runtime.errors import CredentialError
from latticaray.runtime.remote import wire as runtime_wire
from latticaray.state.atoms import decode_atom, encode_atom, sign_atom, verify_atom
from latticaray.state.errors import StateError
from latticaray.state.hlc import Hlc

#: The certificates are checked at one fixed time (inside the seed certificate's validity), so a
#: run is reproducible from its seed.
_CERT_TIME = dt.datetime.now(dt.UTC) + dt.timedelta(minutes=5)


@dataclass(frozen=True)
class Target:
    name: str
    run: Callable[[bytes], object]
    allowed: tuple[type[BaseException], ...]
    seeds: Callable[[], Iterable[bytes]]
    about: str


def _text(data: bytes) -> str:
    # what a msgpack str from the wire can hold: valid UTF-8 (no lone surrogates)
    return data.decode("utf-8", "replace")


# ------------------------------------------------------------------------------------ seeds
@functools.cache
def _key() -> KeyPair:
    return KeyPair.from_private_bytes(bytes(range(32)))


def _multiaddr_seeds() -> list[bytes]:
    peer = _key().peer_id
    texts = [
        "/ip4/127.0.0.1/udp/4001/quic-v1",
        f"/ip4/198.18.0.11/tcp/4001/p2p/{peer}",
        f"/ip4/198.18.0.11/udp/4001/quic-v1/p2p/{peer}/p2p-circuit/p2p/{peer}",
        "/ip6/::1/tcp/80",
        "/dns/example.org/tcp/443",
        "/unix/tmp/latticaray.sock",
    ]
    out = []
    for text in texts:
        out.append(Multiaddr.parse(text).to_bytes())
        out.append(text.encode())
    return out


def _frame_seeds() -> list[bytes]:
    flags = framing.FLAG_MSG
    frames = [
        framing.encode_frame([framing.OPEN, 1, flags, "/svc/1", framing.UNARY, 5000], b"hi"),
        framing.encode_frame([framing.MESSAGE, 1, flags | framing.FLAG_END], b"x" * 300),
        framing.encode_frame([framing.CREDIT, 3, 0, 65536]),
        framing.encode_frame([framing.ERROR, 3, framing.FLAG_RESPONSE, "INTERNAL", "boom"], b"tb"),
        framing.encode_frame([framing.GOAWAY, 0, 0, "SHUTDOWN", "bye"]),
    ]
    return [b"".join(bytes(p) for p in parts) for parts in frames]


def _dag_seeds() -> list[bytes]:
    cid = Cid.of(b"hello world")
    values = [
        {"a": 1, "b": [1, 2, {"c": b"\x00"}], "d": None, "e": True, "f": -7},
        {"links": [cid], "size": 11},
        ["x" * 40, 2**40, -(2**40)],
    ]
    return [dagcbor.encode(v) for v in values]


def _cid_seeds() -> list[bytes]:
    raw = Cid.of(b"hello world")
    return [bytes(raw), str(raw).encode(), bytes(Cid.of(dagcbor.encode({"a": 1}), DAG_CBOR))]


def _manifest_seeds() -> list[bytes]:
    manifest = build_manifest(b"hello world" * 1000, {"kind": "raw"}, chunk_size=4096)
    return [bytes(manifest.encoded)]


def _cert_seeds() -> list[bytes]:
    certified = tls.make_certified_key(_key())
    der = certified.certificate_der
    return [der, der[:200]]


def _signed_key_seeds() -> list[bytes]:
    key = _key()
    return [tls.encode_signed_key(key.peer_id.public_key_protobuf, b"\x01" * 64)]


def _dht_seeds() -> list[bytes]:
    return [
        dht_messages.encode({"op": dht_messages.FIND_NODE, "target": b"\x00" * 32}),
        dht_messages.encode({"op": dht_messages.GET_VALUE, "key": b"k" * 32, "server": False}),
        dht_messages.encode({"op": dht_messages.ADD_PROVIDER, "key": b"p" * 32, "ttl": 60.0}),
        dht_messages.encode({"closer": [], "records": [], "providers": []}),
        dht_messages.encode({"error": "NOT_FOUND", "message": "no such key"}),
    ]


def _atom_seeds() -> list[bytes]:
    key = _key()
    atom = sign_atom(key, "members", "k", "", Hlc(1_700_000_000_000, 1), b"\xc0")
    return [msgpack.packb(encode_atom(atom), use_bin_type=True)]


def _bitswap_seeds() -> list[bytes]:
    cid = Cid.of(b"hello world")
    request = bitswap.Request(root=cid, wants=[bitswap.WantEntry(cid)], cancels=[cid])
    block = bitswap.encode_block_response(cid, b"hello world")
    return [bitswap.encode_request(request), bytes(block)]


def _nat_seeds() -> list[bytes]:
    return [
        nat_wire.encode("dial_resp", id=7, r=[0, 1]),
        nat_wire.encode("connect", id=2, peer="12D3KooW", addrs=["/ip4/1.2.3.4/udp/1/quic-v1"]),
    ]


@functools.cache
def _mesh_key() -> MeshKey:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    return MeshKey(Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33))))


def _credential_seeds() -> list[bytes]:
    mesh = _mesh_key()
    peer = str(_key().peer_id)
    return [
        mesh.issue().encode(),
        mesh.issue(peer, ttl=60).encode(),
        mesh.issue(peer, role="observer").encode(),
        mesh.revoke(peer).encode(),
        mesh.revoke(None, bytes(16)).encode(),
    ]


def _mesh_record_seeds() -> list[bytes]:
    credential = _mesh_key().issue(str(_key().peer_id), ttl=3600)
    return [meshdht.seal(credential, b'{"v": 1}'), meshdht.seal("lrc1.x.y", b"")]


_TID = bytes(range(16))
_OID = _TID + b"\x00\x00\x00\x01"


def _runtime_seeds() -> list[bytes]:
    w = runtime_wire
    caller = str(_key().peer_id)
    args = ["l", [[0, b"\x80\x05K\x01."], [1, _OID, caller]], {"x": [1, _OID, caller]}]
    opts = {"res": {"CPU": 1.0}, "max_retries": 3, "retry_exc": False, "placed": True}
    messages = [
        w.SubmitTask(_TID, b"\x01" * 16, "f", 1, args, opts, blob=b"code", again=True),
        w.CallActor(_TID, b"\xaa" * 16, "inc", 1, "Counter.inc", ["b", b"\x80\x05args"]),
        w.CancelTask(_TID, True),
        w.AckItems(_TID, 3),
        w.TaskDone(_TID, vals=[b"\x80\x05K\x01.", None], inner=[[[_OID, caller]], None]),
        w.TaskDone(_TID, err=b"\x80\x05err", mro=["ValueError", "Exception"]),
        w.YieldItem(_TID, 3, b"item"),
        w.ValuePart(_TID, ("y", 2), b"chunk"),
        w.Admit("lrc1.abc.def", iss=True),
        w.ObjectById(_OID),
        w.ObjectByCid(str(Cid.of(b"hello world"))),
        w.ObjectHeader(0, 12345, str(Cid.of(b"hello world"))),
        w.RefOps([[1, _OID]]),
        w.StreamNext(_TID, 4, 20.0),
        w.NameLookup("default", "counter"),
    ]
    return [m.encode() for m in messages]


#: Every decoder of a runtime protocol's msgpack messages (task, admit, view, object, names,
#: ref, stream): one input goes to each, as a peer can send any bytes on any of them.
_RUNTIME_DECODERS = (
    runtime_wire.decode_task_request,
    runtime_wire.decode_task_reply,
    runtime_wire.decode_admit,
    runtime_wire.decode_view,
    runtime_wire.decode_object_request,
    runtime_wire.decode_object_header,
    runtime_wire.decode_names_request,
    runtime_wire.decode_names_reply,
    runtime_wire.decode_ref,
    runtime_wire.decode_stream_request,
    runtime_wire.decode_stream_reply,
)


@functools.cache
def _libp2p_key() -> PrivateKey:
    return PrivateKey.from_keypair(_key())


def _identify_seeds() -> list[bytes]:
    addr = Multiaddr.parse("/ip4/198.18.0.11/udp/4001/quic-v1")
    info = IdentifyInfo(_key().peer_id, [addr], addr, ["/latticaray/rpc/1"], "latticaray")
    return [info.encode()]


def _unix_seeds() -> list[bytes]:
    key = _key()
    pb = key.peer_id.public_key_protobuf
    hello = unix.MAGIC + bytes(32) + pb
    transcript = unix.auth_transcript(bytes(32), bytes(range(32)), pb, pb)
    reply = bytes(range(32)) + pb + key.sign(b"server:" + transcript)
    return [hello + reply + key.sign(b"client:" + transcript)]


def _multistream_seeds() -> list[bytes]:
    header = encode_message("/multistream/1.0.0")
    return [
        header + encode_message("/yamux/1.0.0"),
        header + encode_message("ls") + encode_message("/noise"),
        header + b"\xff\xfe" + encode_message("/ipfs/id/1.0.0"),
    ]


def _libp2p_seeds() -> list[bytes]:
    """identify, kad, bitswap 1.2, circuit relay v2, DCUtR, signed peer records, keys."""
    key = _libp2p_key()
    peer = key.public_key.peer_id_bytes()
    addr = Multiaddr.parse("/ip4/198.18.0.11/udp/4001/quic-v1").to_bytes()
    cid = bytes(Cid.of(b"hello world"))
    identify = IdentifyMessage(
        public_key=key.public_key.to_protobuf(),
        listen_addrs=(addr,),
        protocols=("/ipfs/id/1.0.0", "/ipfs/kad/1.0.0"),
        observed_addr=addr,
        protocol_version="ipfs/0.1.0",
        agent_version="latticaray",
        signed_peer_record=peer_record.seal_peer_record(key, [addr], seq=1),
    )
    messages = [
        identify.encode(),
        kad.KadMessage(
            kad.MessageType.GET_PROVIDERS,
            key=cid,
            record=kad.KadRecord(b"/pk/x", b"value"),
            closer_peers=(kad.KadPeer(peer, (addr,)),),
            provider_peers=(kad.KadPeer(peer, (addr,), kad.ConnectionType.CONNECTED),),
        ).encode(),
        libp2p_bitswap.BitswapMessage(
            entries=(libp2p_bitswap.WantEntry(cid, send_dont_have=True),),
            full=True,
            blocks=(libp2p_bitswap.BitswapBlock(cid[:4], b"hello world"),),
            presences=(libp2p_bitswap.BlockPresence(cid, libp2p_bitswap.PresenceType.HAVE),),
        ).encode(),
        relay.HopMessage(
            relay.HopType.CONNECT,
            peer=relay.RelayPeer(peer, (addr,)),
            status=relay.RelayStatus.OK,
        ).encode(),
        relay.StopMessage(relay.StopType.CONNECT, peer=relay.RelayPeer(peer, (addr,))).encode(),
        relay.Voucher(peer, peer, 1_700_000_000).seal(key),
        dcutr.HolePunch(dcutr.HolePunchType.CONNECT, (addr,)).encode(),
        key.public_key.to_protobuf(),
        encode_length_prefixed(identify.encode()),
    ]
    return [bytes([i]) + m for i, m in enumerate(messages)]


def _noise_seeds() -> list[bytes]:
    key = _libp2p_key()
    payload = NoiseHandshakePayload(
        key.public_key.to_protobuf(),
        key.sign(b"noise-libp2p-static-key:" + bytes(32)),
        ("/yamux/1.0.0",),
    ).encode()
    initiator = NoiseCore(NoiseRole.INITIATOR, key)
    return [b"\x00" + payload, b"\x01" + initiator.initiate()]


def _yamux_seeds() -> list[bytes]:
    h = YAMUX_HEADER.pack
    return [
        h(0, YamuxFrame.DATA, YamuxFlag.SYN, 1, 5)
        + b"hello"
        + h(0, YamuxFrame.DATA, YamuxFlag.FIN, 1, 0),
        h(0, YamuxFrame.WINDOW_UPDATE, YamuxFlag.SYN, 3, 1024)
        + b"\xff\xfe"
        + h(0, YamuxFrame.PING, YamuxFlag.SYN, 0, 7)
        + h(0, YamuxFrame.WINDOW_UPDATE, YamuxFlag.RST, 3, 0),
        h(0, YamuxFrame.GO_AWAY, 0, 0, 0),
    ]


# ----------------------------------------------------------------------------------- targets
_MULTIADDR_ERRORS = (MeshError,)


def _each(data: bytes, allowed: tuple[type[BaseException], ...], *decoders: Callable) -> None:
    """Feed ``data`` to every decoder; a decoder's clean refusal does not stop the next one."""
    for decode in decoders:
        try:
            decode(data)
        except allowed:
            pass


def _multiaddr(data: bytes) -> None:
    _each(data, _MULTIADDR_ERRORS, Multiaddr.from_bytes, lambda d: Multiaddr.parse(_text(d)))


def _frames(data: bytes) -> None:
    decoder = framing.FrameDecoder(max_payload=1 << 14)
    # split the input where the fuzzer put a 0xff 0xfe marker: frames arrive in pieces
    for piece in data.split(b"\xff\xfe"):
        decoder.feed(piece)


def _dagcbor(data: bytes) -> None:
    dagcbor.decode(data)


def _cid(data: bytes) -> None:
    _each(data, (ObjectStoreError,), Cid.decode, lambda d: Cid.parse(_text(d)))


def _manifest(data: bytes) -> None:
    Manifest.decode(Cid.of(data, DAG_CBOR), data)


def _certificate(data: bytes) -> None:
    tls.verify_certificate(data, now=_CERT_TIME)


def _signed_key(data: bytes) -> None:
    public, _signature = tls.decode_signed_key(data)
    decode_public_key_protobuf(public)


def _dht(data: bytes) -> None:
    _each(data, (DhtError,), dht_messages.decode_request, dht_messages.decode_response)


def _atom(data: bytes) -> None:
    try:
        item = msgpack.unpackb(data, raw=False)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError):
        return  # not msgpack at all: the replication layer refuses it before decode_atom
    atom = decode_atom(item)
    verify_atom(atom)


def _bitswap(data: bytes) -> None:
    _each(data, (ObjectStoreError,), bitswap.decode_request, bitswap.decode_response)


def _nat(data: bytes) -> None:
    msg = nat_wire.decode(data)
    nat_wire.get_str(msg, "peer", optional=True)
    nat_wire.get_str_list(msg, "addrs", 8) if "addrs" in msg else None
    nat_wire.get_endpoints(msg, "eps", 8) if "eps" in msg else None


def _credential(data: bytes) -> None:
    _each(
        data,
        (CredentialError,),
        lambda d: Credential.parse(_text(d)),
        lambda d: verify_revocation(_text(d), _mesh_key().public_bytes),
    )


class _RecordOf:
    """A DHT record as MemberRecords reads one: the fuzzer's bytes are its value."""

    def __init__(self, value: bytes) -> None:
        self.publisher = _key().peer_id.to_bytes()
        self.subkey = self.publisher
        self.key = b"lr1/x/capacity/CPU"
        self.value = value


@functools.cache
def _member_records() -> meshdht.MemberRecords:
    mesh_public = _mesh_key().public_bytes

    def check(publisher: str, text: str) -> Credential:
        return verify_credential(text, mesh_public, publisher, now=0.0)

    return meshdht.MemberRecords(b"lr1/x/", check)


def _mesh_record(data: bytes) -> None:
    try:
        meshdht.unseal(data)
    except ValueError:
        pass
    _member_records().validate(_RecordOf(data))


def _runtime(data: bytes) -> None:
    _each(data, (runtime_wire.WireError,), *_RUNTIME_DECODERS)


def _unix(data: bytes) -> None:
    """The Unix-socket handshake as both sides read it: the client's hello and signature at
    the server, the server's reply at the client (each a fixed-size read)."""
    hello = data[: unix.HELLO_LEN]
    reply = data[unix.HELLO_LEN : unix.HELLO_LEN + unix.REPLY_LEN]
    sig_c = data[unix.HELLO_LEN + unix.REPLY_LEN :]
    server_pb = _key().peer_id.public_key_protobuf
    try:
        nonce, client_pb, client = unix.read_hello(hello)
        client.verify(
            sig_c, b"client:" + unix.auth_transcript(nonce, bytes(32), client_pb, server_pb)
        )
    except MeshError:
        pass
    server_nonce, server_pk, sig_s, server = unix.read_reply(reply)
    server.verify(
        sig_s, b"server:" + unix.auth_transcript(bytes(32), server_nonce, server_pb, server_pk)
    )


def _multistream(data: bytes) -> None:
    """Both sides of a negotiation, the input arriving in pieces (split at 0xff 0xfe)."""
    pieces = data.split(b"\xff\xfe")
    for core in (
        MultistreamCore(MultistreamRole.RESPONDER, ["/yamux/1.0.0", "/noise"]),
        MultistreamCore(MultistreamRole.INITIATOR, ["/noise", "/yamux/1.0.0"]),
    ):
        core.initiate()
        try:
            for piece in pieces:
                if core.receive(piece):
                    break
        except MeshError:
            pass


def _libp2p(data: bytes) -> None:
    """The first byte picks the libp2p protobuf decoder; the rest is the message."""
    if not data:
        return
    body = data[1:]
    which = data[0] % 9
    if which == 0:
        message = IdentifyMessage.decode(body)
        message.multiaddrs()
        message.key()
        if message.signed_peer_record:
            peer_record.open_peer_record(message.signed_peer_record)
    elif which == 1:
        kad.KadMessage.decode(body)
    elif which == 2:
        for block in libp2p_bitswap.BitswapMessage.decode(body).blocks:
            block.cid()
    elif which == 3:
        relay.HopMessage.decode(body)
    elif which == 4:
        relay.StopMessage.decode(body)
    elif which == 5:
        relay.open_voucher(body, _libp2p_key().public_key.peer_id_bytes())
    elif which == 6:
        dcutr.HolePunch.decode(body)
    elif which == 7:
        PublicKey.from_protobuf(body)
    else:
        decoder = LengthPrefixedDecoder(4096)
        for piece in body.split(b"\xff\xfe"):
            decoder.feed(piece)


def _identify(data: bytes) -> None:
    IdentifyInfo.decode(data)


def _noise(data: bytes) -> None:
    """0: the handshake payload (identity key, signature, extensions); 1: a responder's read of
    the first handshake messages (frames, ephemeral key, then whatever follows)."""
    if not data:
        return
    if data[0] & 1 == 0:
        payload = NoiseHandshakePayload.decode(data[1:])
        PublicKey.from_protobuf(payload.identity_key)
        return
    core = NoiseCore(NoiseRole.RESPONDER, _libp2p_key())
    core.initiate()
    for piece in data[1:].split(b"\xff\xfe"):
        core.receive(piece)


def _yamux(data: bytes) -> None:
    """A yamux session (server side) fed the input in pieces, with time moving on."""
    core = YamuxCore(False, keepalive=10.0)
    for now, piece in enumerate(data.split(b"\xff\xfe")):
        core.receive(piece, float(now))
        core.data_to_send()


TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target(
            "multiaddr",
            _multiaddr,
            _MULTIADDR_ERRORS,
            _multiaddr_seeds,
            "multiaddr binary and text forms",
        ),
        Target("frames", _frames, (MeshError,), _frame_seeds, "RPC frames, incremental"),
        Target("dagcbor", _dagcbor, (ObjectStoreError,), _dag_seeds, "DAG-CBOR values"),
        Target("cid", _cid, (ObjectStoreError,), _cid_seeds, "CIDs, binary and multibase text"),
        Target(
            "manifest",
            _manifest,
            (ObjectStoreError,),
            _manifest_seeds,
            "object manifests (DAG-CBOR root blocks)",
        ),
        Target(
            "certificate",
            _certificate,
            (MeshError,),
            _cert_seeds,
            "libp2p TLS certificates (X.509 parse, extension, signature)",
        ),
        Target(
            "signed_key",
            _signed_key,
            (MeshError, PeerIdError),
            _signed_key_seeds,
            "the libp2p certificate extension and public-key protobuf",
        ),
        Target("dht", _dht, (DhtError,), _dht_seeds, "DHT requests and responses (records)"),
        Target("atom", _atom, (StateError,), _atom_seeds, "signed CRDT atoms"),
        Target(
            "bitswap",
            _bitswap,
            (ObjectStoreError,),
            _bitswap_seeds,
            "Bitswap requests and block responses",
        ),
        Target("nat", _nat, (NatError,), _nat_seeds, "NAT wire messages (relay, AutoNAT, DCUtR)"),
        Target(
            "credential",
            _credential,
            (CredentialError,),
            _credential_seeds,
            "membership credentials and revocations",
        ),
        Target(
            "mesh_record",
            _mesh_record,
            (DhtError,),
            _mesh_record_seeds,
            "a mesh's runtime DHT records: the credential envelope and its check",
        ),
        Target(
            "runtime",
            _runtime,
            (runtime_wire.WireError,),
            _runtime_seeds,
            "runtime protocol messages (msgpack: task, admit, view, object, names, ref, stream)",
        ),
        Target(
            "unix",
            _unix,
            (MeshError,),
            _unix_seeds,
            "the Unix-socket handshake (hello, reply, signatures)",
        ),
        Target(
            "multistream",
            _multistream,
            (MeshError,),
            _multistream_seeds,
            "libp2p multistream-select, both roles, incremental",
        ),
        Target(
            "libp2p",
            _libp2p,
            (MeshError,),
            _libp2p_seeds,
            "libp2p protobufs: identify, kad, bitswap 1.2, relay v2, DCUtR, peer records, keys",
        ),
        Target("identify", _identify, (MeshError,), _identify_seeds, "the mesh's identify record"),
        Target(
            "noise",
            _noise,
            (MeshError,),
            _noise_seeds,
            "libp2p Noise XX: handshake payload, responder reads",
        ),
        Target("yamux", _yamux, (MeshError,), _yamux_seeds, "yamux frames, incremental"),
    )
}
