"""The typed runtime wire messages (the runtime/remote/wire package) against the maps the runtime sends.

Each ``legacy_*`` function builds a message exactly as runtime/cluster.py builds it today (the
function it mirrors is named); the typed message must encode to the same bytes, and decode from
them to the same message, so nodes with and without the typed layer interoperate. Malformed input
of every kind (not msgpack, not a map, a key missing, a wrong type, an oversize field, an unknown
kind) raises WireError with status INVALID_ARGUMENT, and nothing else: a property test feeds
random corruptions of valid messages through every decoder.
"""

from __future__ import annotations

import dataclasses
import os

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from latticaray.mesh.errors import RpcError
from latticaray.mesh.rpc import Status
from latticaray.runtime.remote import wire
from latticaray.runtime.remote.wire import (
    AckItems,
    ActorCreated,
    Admit,
    CallActor,
    CancelTask,
    ClaimRefused,
    CreateActor,
    Fence,
    Fenced,
    KillActor,
    NameClaim,
    NameHosted,
    NameHostedReply,
    NameLookup,
    NameLookupReply,
    NameMoved,
    NamePlaced,
    NameRecord,
    NameRelease,
    NamesOk,
    ObjectByCid,
    ObjectById,
    ObjectHeader,
    ObjectMissing,
    RefOps,
    RefsHeld,
    ResultsFetched,
    RuntimeView,
    StreamEnd,
    StreamItemRef,
    StreamNext,
    StreamTimeout,
    SubmitTask,
    TaskDone,
    UnknownKind,
    ValuePart,
    WireError,
    YieldItem,
)

TID = bytes(range(16))
TID2 = bytes(range(16, 32))
AID = b"\xaa" * 16
OID = TID + b"\x00\x00\x00\x01"
OID2 = TID2 + b"\x00\x00\x00\x00"
FN = b"\x01" * 16
CALLER = "12D3KooWQfGkPUkoLDEeJE3H3ZTmu9BZvAdbJpmhha8WzDeSHaAa"
EXECUTOR = "12D3KooWRq4tRSoUmNMhXDV6kqjxbjhSJQNz9oBzQmXdK3YTP4L1"
STORE_REF = b"\0LRSTORE1:bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku"
META = {"methods": {"inc": {"nret": 1}}, "is_async": False, "cname": "Counter"}


def _pack(message: dict) -> bytes:  # cluster.py's _pack
    return msgpack.packb(message, use_bin_type=True)


def _wire_args_l():
    """What MeshCluster._wire_args makes of list-form arguments: a value, a store value named
    by CID with its holder, a borrowed ref, a keyword ref."""
    return [
        "l",
        [[0, b"\x80\x05K\x01."], [0, STORE_REF, OID, CALLER, EXECUTOR], [1, OID2, EXECUTOR]],
        {"x": [0, STORE_REF, OID, CALLER], "y": [1, OID, CALLER]},
    ]


# ---------------------------------------------------------------- the maps cluster.py builds
def legacy_task(blob=None, resent=False, got=None, args=None):
    """MeshCluster.run_remote."""
    msg = {
        "op": "submit",
        "tid": TID,
        "fn": FN,
        "name": "f",
        "nret": 1,
        "opts": {"res": {"CPU": 1.0}, "max_retries": 3, "retry_exc": False},
        "parent": None,
        "args": args if args is not None else ["b", b"\x80\x05args"],
    }
    out = {
        "tid": TID,
        "fn": msg["fn"],
        "name": "f",
        "nret": msg["nret"],
        "args": msg["args"],
        "opts": dict(msg["opts"], placed=True),
    }
    if blob is not None:
        out["blob"] = blob
    if resent:
        out["again"] = True
        if got is not None:
            out["got"] = got
    return {"k": "task", "m": out}


def legacy_create(with_rid=False, blob=None):
    """MeshCluster._send_create over the client's create_actor message as the node keeps it
    (node._create_actor / _adopt_actor: ``blob`` and ``inner`` popped, ``owner`` set)."""
    opts = {
        "resources": {"CPU": 0.0},
        "max_restarts": 2,
        "max_task_retries": 0,
        "max_concurrency": None,
        "is_async": False,
        "meta": META,
        "name": None,
        "namespace": "default",
        "lifetime": None,
        "get_if_exists": False,
    }
    owned = {"op": "create_actor", "aid": AID, "cls": FN, "cname": "Counter", "opts": opts}
    owned["args"] = ["b", b"\x80\x05ctor"]
    if with_rid:
        owned["rid"] = 7  # a named creation from a worker came as a request
    owned.setdefault("owner", CALLER)
    message = dict(owned)
    if blob is not None:
        message["blob"] = blob
    message["opts"] = dict(message["opts"], strategy=None, max_restarts=1)
    message["args"] = ["b", b"\x80\x05ctor"]
    return {"k": "create", "m": message}


def legacy_acall(resent=False):
    """MeshCluster.pump_actor."""
    out = {
        "tid": TID,
        "aid": AID,
        "m": "inc",
        "nret": 1,
        "name": "Counter.inc",
        "args": _wire_args_l(),
    }
    if resent:
        out["again"] = True
    return {"k": "acall", "m": out}


LEGACY_REQUESTS = {
    "task": (
        legacy_task(),
        SubmitTask(
            TID,
            FN,
            "f",
            1,
            ["b", b"\x80\x05args"],
            {"res": {"CPU": 1.0}, "max_retries": 3, "retry_exc": False, "placed": True},
        ),
    ),
    "task blob": (
        legacy_task(blob=b"code", args=_wire_args_l()),
        SubmitTask(
            TID,
            FN,
            "f",
            1,
            _wire_args_l(),
            {"res": {"CPU": 1.0}, "max_retries": 3, "retry_exc": False, "placed": True},
            blob=b"code",
        ),
    ),
    "task again got": (
        legacy_task(resent=True, got=0),
        SubmitTask(
            TID,
            FN,
            "f",
            1,
            ["b", b"\x80\x05args"],
            {"res": {"CPU": 1.0}, "max_retries": 3, "retry_exc": False, "placed": True},
            again=True,
            got=0,
        ),
    ),
    "acall": (legacy_acall(), CallActor(TID, AID, "inc", 1, "Counter.inc", _wire_args_l())),
    "acall again": (
        legacy_acall(resent=True),
        CallActor(TID, AID, "inc", 1, "Counter.inc", _wire_args_l(), again=True),
    ),
    # MeshCluster.cancel_remote / ack_remote_stream / run_remote's lost ack / ack_held /
    # kill_remote_actor / unpin_at / _move_session
    "cancel": ({"k": "cancel", "tid": TID, "force": True}, CancelTask(TID, True)),
    "ack": ({"k": "ack", "tid": TID, "n": 5}, AckItems(TID, 5)),
    "held task": ({"k": "held", "tid": TID}, RefsHeld(TID)),
    "held item": ({"k": "held", "tid": OID}, RefsHeld(OID)),
    "kill": ({"k": "kill", "aid": AID, "no_restart": True}, KillActor(AID, True)),
    "kill reclaimed": (
        {"k": "kill", "aid": AID, "no_restart": True, "cause": "every handle to it went"},
        KillActor(AID, True, "every handle to it went"),
    ),
    "fetched": (
        {"k": "fetched", "cids": ["bafyone", "bafytwo"]},
        ResultsFetched(["bafyone", "bafytwo"]),
    ),
    "fence": ({"k": "fence"}, Fence()),
}

ERR = b"\x80\x05pickled exception"
LEGACY_REPLIES = {
    # RemoteClient.on_task_complete: vals (one inline, one sent as parts), refs inside
    "done vals": (  # the second ref inside the first result is an actor handle (actor id)
        {
            "k": "done",
            "tid": TID,
            "vals": [b"v", None],
            "inner": [[[OID, CALLER], [AID, CALLER]], []],
        },
        TaskDone(TID, vals=[b"v", None], inner=[[[OID, CALLER], [AID, CALLER]], []]),
    ),
    # ... a task that raised (the worker's mro)
    "done err": (
        {"k": "done", "tid": TID, "err": ERR, "mro": ["ValueError", "Exception"]},
        TaskDone(TID, err=ERR, mro=["ValueError", "Exception"]),
    ),
    # ... a streaming task's end
    "done stream": ({"k": "done", "tid": TID}, TaskDone(TID)),
    # _session_requests (executor lacks the code) / _stream_items_gone / _packed_portable
    "done err only": ({"k": "done", "tid": TID, "err": ERR}, TaskDone(TID, err=ERR)),
    # RemoteClient.on_task_yield
    "yield": ({"k": "yield", "tid": TID, "i": 3, "d": b"item"}, YieldItem(TID, 3, b"item")),
    "yield parts inner": (
        {"k": "yield", "tid": TID, "i": 4, "d": None, "inner": [[OID, CALLER]]},
        YieldItem(TID, 4, None, [[OID, CALLER]]),
    ),
    # RemoteClient._parts
    "part": ({"k": "part", "tid": TID, "slot": 1, "d": b"chunk"}, ValuePart(TID, 1, b"chunk")),
    "part item": (
        {"k": "part", "tid": TID, "slot": ("y", 2), "d": b"chunk"},
        ValuePart(TID, ("y", 2), b"chunk"),
    ),
    # _session_requests: created / fenced
    "created": ({"k": "created", "aid": AID, "error": None}, ActorCreated(AID)),
    "created error": ({"k": "created", "aid": AID, "error": ERR}, ActorCreated(AID, ERR)),
    "fenced": ({"k": "fenced"}, Fenced()),
}


@pytest.mark.parametrize("case", sorted(LEGACY_REQUESTS))
def test_task_requests_match_the_maps_cluster_builds(case):
    legacy, typed = LEGACY_REQUESTS[case]
    data = _pack(legacy)
    assert typed.encode() == data  # byte for byte: an old executor reads the same
    assert wire.decode_task_request(data) == typed  # a new executor reads an old caller
    assert wire.decode_task_request(typed.encode()) == typed


@pytest.mark.parametrize("case", sorted(LEGACY_REPLIES))
def test_task_replies_match_the_maps_cluster_builds(case):
    legacy, typed = LEGACY_REPLIES[case]
    data = _pack(legacy)
    assert typed.encode() == data
    assert wire.decode_task_reply(data) == typed
    assert wire.decode_task_reply(typed.encode()) == typed


def test_create_drops_the_client_request_keys_old_executors_never_read():
    """The node forwards the client's whole create_actor map, with its ``op`` (and ``rid`` when
    it came as a request): a new caller leaves those out, which an old executor never reads."""
    for legacy in (legacy_create(), legacy_create(with_rid=True, blob=b"class code")):
        typed = wire.decode_task_request(_pack(legacy))
        assert isinstance(typed, CreateActor)
        assert (typed.aid, typed.cls, typed.cname, typed.owner) == (AID, FN, "Counter", CALLER)
        assert typed.opts == legacy["m"]["opts"] and typed.args == legacy["m"]["args"]
        assert typed.blob == legacy["m"].get("blob")
        expected = {k: v for k, v in legacy["m"].items() if k not in ("op", "rid")}
        assert msgpack.unpackb(typed.encode(), raw=False)["m"] == expected
        assert wire.decode_task_request(typed.encode()) == typed


def test_memoryview_parts_encode_like_the_slices_cluster_packs():
    whole = memoryview(os.urandom(1000))
    legacy = _pack({"k": "part", "tid": TID, "slot": 0, "d": whole[100:600]})
    assert ValuePart(TID, 0, whole[100:600]).encode() == legacy
    assert wire.decode_task_reply(legacy) == ValuePart(TID, 0, bytes(whole[100:600]))


def test_dispatch_tables_and_match():
    assert set(wire.TASK_REQUEST_KINDS) == {
        "task",
        "create",
        "acall",
        "cancel",
        "ack",
        "held",
        "kill",
        "fetched",
        "fence",
    }
    assert set(wire.TASK_REPLY_KINDS) == {
        "done",
        "rejected",
        "yield",
        "part",
        "created",
        "fenced",
        "log",
    }
    for kind, decode in wire.TASK_REQUEST_KINDS.items():
        assert decode.__self__.KIND == kind
    seen = []
    for _legacy, typed in LEGACY_REQUESTS.values():
        match wire.decode_task_request(typed.encode()):
            case SubmitTask(tid=tid, again=again):
                seen.append(("task", tid, again))
            case CancelTask(tid, force):
                seen.append(("cancel", tid, force))
            case AckItems(tid, n):
                seen.append(("ack", tid, n))
            case _:
                pass
    assert ("cancel", TID, True) in seen and ("ack", TID, 5) in seen
    assert ("task", TID, True) in seen and ("task", TID, False) in seen


def test_spillback_messages():
    """`spill` on a task (the caller takes a rejection) and `rejected` with the executor's view;
    both absent from what an old caller / executor sends."""
    task = SubmitTask(TID, FN, "f", 1, ["b", b"args"], {"placed": True}, spill=True)
    assert msgpack.unpackb(task.encode(), raw=False)["m"]["spill"] is True
    assert wire.decode_task_request(task.encode()) == task
    plain = SubmitTask(TID, FN, "f", 1, ["b", b"args"], {"placed": True})
    assert "spill" not in msgpack.unpackb(plain.encode(), raw=False)["m"]
    rejected = wire.TaskRejected(TID, "busy", {"CPU": 1.0}, {"CPU": 0.0}, 1, 1, 1)
    assert wire.decode_task_reply(rejected.encode()) == rejected
    unbounded = wire.TaskRejected(TID, "busy", {"CPU": 1.0}, {}, 0, 1)
    assert "qlimit" not in msgpack.unpackb(unbounded.encode(), raw=False)
    assert wire.decode_task_reply(unbounded.encode()) == unbounded
    for bad in (
        {"k": "rejected", "tid": TID, "why": "x", "total": {"CPU": "1"}, "avail": {}},
        {"k": "rejected", "tid": TID, "why": 3, "total": {}, "avail": {}, "queued": 0},
        {"k": "rejected", "tid": TID, "why": "x", "total": {}, "avail": {}, "queued": -1},
    ):
        with pytest.raises(wire.WireError):
            wire.decode_task_reply(_pack(bad))


def test_messages_are_frozen_and_slotted():
    message = AckItems(TID, 1)
    with pytest.raises(AttributeError):
        message.n = 2
    assert not hasattr(message, "__dict__")


# ------------------------------------------------------------------------ the other protocols
def test_admit():
    legacy = _pack({"cred": "lrc1.abc.def"})  # _admit_with / _serve_admit
    assert Admit("lrc1.abc.def").encode() == legacy
    assert wire.decode_admit(legacy) == Admit("lrc1.abc.def")
    with pytest.raises(WireError):
        wire.decode_admit(_pack({"cred": "x" * 3000}))
    with pytest.raises(WireError):
        wire.decode_admit(b"\x80" * 5000)
    with pytest.raises(WireError):
        wire.decode_admit(_pack({"cred": None}))


def _legacy_view(names):
    """MeshCluster._view_payload."""
    return {
        "total": {"CPU": 4.0, "widget": 1.0},
        "avail": {"CPU": 2.5, "widget": 0.0},
        "queued": 3,
        "running": 2,
        "peers": {EXECUTOR: ["/ip4/127.0.0.1/udp/4001/quic-v1", "/ip4/127.0.0.1/tcp/4001"]},
        "names": [[ns, name, rec] for (ns, name), rec in names.items() if not rec.get("pending")],
    }


def test_view_with_the_records_the_arbiter_keeps():
    # _names_op: a claim, then one that was pending and got placed (``wait_s`` stays)
    placed = {"aid": AID, "node": None, "owner": CALLER, "meta": META, "detached": False}
    placed.update(pending=True, wait_s=10.0)
    placed["node"] = EXECUTOR
    placed.pop("pending", None)
    names = {
        ("default", "a"): {
            "aid": AID,
            "node": EXECUTOR,
            "owner": CALLER,
            "meta": None,
            "detached": True,
        },
        ("default", "b"): placed,
        ("ns", "c"): {
            "aid": AID,
            "node": None,
            "owner": CALLER,
            "meta": None,
            "detached": False,
            "pending": True,
            "wait_s": 3.0,
        },
    }
    legacy = _pack(_legacy_view(names))
    typed = RuntimeView(
        {"CPU": 4.0, "widget": 1.0},
        {"CPU": 2.5, "widget": 0.0},
        3,
        2,
        {EXECUTOR: ["/ip4/127.0.0.1/udp/4001/quic-v1", "/ip4/127.0.0.1/tcp/4001"]},
        [
            ("default", "a", NameRecord(AID, EXECUTOR, CALLER, None, True)),
            ("default", "b", NameRecord(AID, EXECUTOR, CALLER, META, False, wait_s=10.0)),
        ],
    )
    assert typed.encode() == legacy
    assert wire.decode_view(legacy) == typed
    bounded = dataclasses.replace(typed, qlimit=4)
    assert wire.decode_view(bounded.encode()) == bounded
    pending = NameRecord(AID, None, CALLER, None, False, pending=True, wait_s=3.0)
    assert pending.to_wire() == names[("ns", "c")]
    # `drop` (sparse peering: the sender evicts the receiver from its neighbourhood) is a flag
    # sent only when set; anything but a boolean (or an integer truth value) is refused
    dropping = RuntimeView({}, {}, 0, 0, {}, [], b"inc", drop=True)
    assert msgpack.unpackb(dropping.encode())["drop"] is True
    assert "drop" not in msgpack.unpackb(typed.encode())
    assert wire.decode_view(dropping.encode()) == dropping
    with pytest.raises(WireError):
        wire.decode_view(_pack({**msgpack.unpackb(dropping.encode()), "drop": "yes"}))


def test_object_protocol():
    # MeshCluster.fetch_object / fetch_by_cid / _serve_object
    assert ObjectById(OID).encode() == _pack({"oid": OID})
    assert ObjectByCid("bafyx").encode() == _pack({"cid": "bafyx"})
    assert wire.decode_object_request(_pack({"oid": OID})) == ObjectById(OID)
    assert wire.decode_object_request(_pack({"cid": "bafyx"})) == ObjectByCid("bafyx")
    header = {"s": 0, "size": 12345, "cid": "bafyx"}
    assert ObjectHeader(0, 12345, "bafyx").encode() == _pack(header)
    assert wire.decode_object_header(_pack(header)) == ObjectHeader(0, 12345, "bafyx")
    missing = {"missing": True, "why": "this node does not hold the object"}
    assert ObjectMissing(missing["why"]).encode() == _pack(missing)
    assert wire.decode_object_header(_pack(missing)) == ObjectMissing(missing["why"])
    for bad in ({"s": 0, "size": -1, "cid": None}, {"s": 0, "cid": "x"}, {"s": 2, "size": 1}):
        with pytest.raises(WireError):
            wire.decode_object_header(_pack(bad))
    with pytest.raises(WireError):
        wire.decode_object_request(_pack({"oid": b"short"}))


def test_names_requests_match_the_maps_cluster_builds():
    claim = {  # claim_actor_name
        "op": "claim",
        "ns": "default",
        "name": "counter",
        "aid": AID,
        "owner": CALLER,
        "host": EXECUTOR,
        "meta": META,
        "get_if_exists": False,
        "detached": True,
    }
    pending = dict(claim, host=None)
    pending.update(pending=True, wait_s=10.0)
    cases = [
        (claim, NameClaim("default", "counter", AID, CALLER, EXECUTOR, META, False, True)),
        (
            pending,
            NameClaim(
                "default",
                "counter",
                AID,
                CALLER,
                None,
                META,
                False,
                True,
                pending=True,
                wait_s=10.0,
            ),
        ),
        ({"op": "lookup", "ns": "default", "name": "counter"}, NameLookup("default", "counter")),
        ({"op": "release", "ns": "d", "name": "n", "aid": AID}, NameRelease("d", "n", AID)),
        (
            {"op": "placed", "ns": "d", "name": "n", "aid": AID, "node": EXECUTOR},
            NamePlaced("d", "n", AID, EXECUTOR),
        ),
        (
            {"op": "moved", "ns": "d", "name": "n", "aid": AID, "node": EXECUTOR},
            NameMoved("d", "n", AID, EXECUTOR),
        ),
        ({"op": "hosted", "ns": "d", "name": "n", "aid": AID}, NameHosted("d", "n", AID)),
    ]
    for legacy, typed in cases:
        assert typed.encode() == _pack(legacy)
        assert wire.decode_names_request(_pack(legacy)) == typed
    with pytest.raises(WireError, match="unknown names op"):
        wire.decode_names_request(_pack({"op": "steal", "ns": "d", "name": "n"}))


def test_names_replies_match_the_maps_names_op_returns():
    record = {"aid": AID, "node": EXECUTOR, "owner": CALLER, "meta": None, "detached": False}
    typed_record = NameRecord(AID, EXECUTOR, CALLER, None, False)
    cases = [
        ({"ok": True}, NamesOk()),
        ({"ok": False, "existing": record, "holder": CALLER}, ClaimRefused(typed_record, CALLER)),
        ({"existing": record}, NameLookupReply(typed_record)),
        ({"existing": None}, NameLookupReply(None)),
        ({"meta": META}, NameHostedReply(META)),
        ({"meta": None}, NameHostedReply(None)),
    ]
    for legacy, typed in cases:
        assert typed.encode() == _pack(legacy)
        assert wire.decode_names_reply(_pack(legacy)) == typed
    with pytest.raises(WireError):
        wire.decode_names_reply(_pack({"error": "unknown names op 'x'"}))


def test_ref_ops():
    ops = [[1, OID], [0, OID2], [1, AID]]  # RefTable._send queues [op, oid]; an actor id counts
    assert RefOps(ops).encode() == _pack({"ops": ops})  # the handles of an actor (16 bytes)
    assert wire.decode_ref(_pack({"ops": ops})) == RefOps(ops)
    for bad in ([[2, OID]], [[1, b"short"]], [[1, OID + b"x"]], [[1]], "ops", [[True, OID]]):
        with pytest.raises(WireError):
            wire.decode_ref(_pack({"ops": bad}))
    with pytest.raises(WireError):
        wire.decode_ref(_pack({"ops": [[1, OID]] * (wire.MAX_REF_OPS + 1)}))


def test_stream_protocol():
    request = {"tid": TID, "i": 4, "timeout": 20.0}  # remote_stream_next
    assert StreamNext(TID, 4, 20.0).encode() == _pack(request)
    assert wire.decode_stream_request(_pack(request)) == StreamNext(TID, 4, 20.0)
    assert wire.decode_stream_request(_pack(dict(request, timeout=None))).timeout is None
    assert wire.decode_stream_request(_pack(dict(request, timeout=3))).timeout == 3.0
    for bad in (dict(request, i=-1), dict(request, tid="x"), dict(request, timeout="soon")):
        with pytest.raises(WireError):
            wire.decode_stream_request(_pack(bad))
    # node._req_stream_next's replies (with borrow=True no "held")
    for legacy, typed in (
        ({"oid": OID, "owner": EXECUTOR}, StreamItemRef(OID, EXECUTOR)),
        ({"end": True}, StreamEnd()),
        ({"timeout": True}, StreamTimeout()),
    ):
        assert typed.encode() == _pack(legacy)
        assert wire.decode_stream_reply(_pack(legacy)) == typed


# ------------------------------------------------------------------------------ malformed input
def _request_error(data: bytes) -> WireError:
    with pytest.raises(WireError) as info:
        wire.decode_task_request(data)
    return info.value


def test_malformed_task_messages_raise_invalid_argument():
    error = _request_error(b"\xc1")  # never used in msgpack
    assert isinstance(error, RpcError) and isinstance(error, ValueError)
    assert error.code == Status.INVALID_ARGUMENT
    assert "msgpack" in str(_request_error(_pack([1, 2])))
    assert "no 'tid'" in str(_request_error(_pack({"k": "ack", "n": 1})))
    assert "'n' must be" in str(_request_error(_pack({"k": "ack", "tid": TID, "n": "1"})))
    assert "'n' must be" in str(_request_error(_pack({"k": "ack", "tid": TID, "n": -1})))
    assert "'tid' must be 16 bytes" in str(_request_error(_pack({"k": "ack", "tid": b"x", "n": 1})))
    task = legacy_task()
    task["m"]["name"] = "n" * (wire.MAX_NAME + 1)
    assert "'name' must be" in str(_request_error(_pack(task)))
    task = legacy_task()
    task["m"]["args"] = ["l", [[0, b"v", OID]], {}]  # a resolved argument cut short
    assert "'args' must be" in str(_request_error(_pack(task)))
    task = legacy_task()
    task["m"]["opts"] = [1, 2]
    assert "'opts' must be" in str(_request_error(_pack(task)))
    task["m"]["opts"] = {1: 2}  # every map of the protocols has string keys
    assert "map key" in str(_request_error(_pack(task)))
    task = legacy_task()
    task["m"]["nret"] = -2
    assert "'nret' must be" in str(_request_error(_pack(task)))
    assert "'m' must be" in str(_request_error(_pack({"k": "task", "m": [1]})))


def test_unknown_kinds_raise_unknown_kind():
    with pytest.raises(UnknownKind) as info:
        wire.decode_task_request(_pack({"k": "teleport", "tid": TID}))
    assert info.value.kind == "teleport" and isinstance(info.value, WireError)
    with pytest.raises(UnknownKind):
        wire.decode_task_request(_pack({"tid": TID}))
    with pytest.raises(UnknownKind):  # a reply kind is not a request
        wire.decode_task_request(_pack({"k": "done", "tid": TID}))
    with pytest.raises(UnknownKind):
        wire.decode_task_reply(_pack({"k": "task", "m": {}}))


def test_oversize_values_are_refused():
    big = b"x" * (wire.CHUNK + 1)
    for message in (
        {"k": "done", "tid": TID, "vals": [big]},
        {"k": "yield", "tid": TID, "i": 0, "d": big},
        {"k": "part", "tid": TID, "slot": 0, "d": big},
    ):
        with pytest.raises(WireError):
            wire.decode_task_reply(_pack(message))
    for decode in (wire.decode_names_request, wire.decode_ref, wire.decode_stream_request):
        with pytest.raises(WireError, match="exceeds"):
            decode(b"\x00" * (wire.MAX_CONTROL_MESSAGE + 1))


DECODERS = [
    wire.decode_task_request,
    wire.decode_task_reply,
    wire.decode_admit,
    wire.decode_view,
    wire.decode_object_request,
    wire.decode_object_header,
    wire.decode_names_request,
    wire.decode_names_reply,
    wire.decode_ref,
    wire.decode_stream_request,
    wire.decode_stream_reply,
]
VALID = [legacy for legacy, _ in [*LEGACY_REQUESTS.values(), *LEGACY_REPLIES.values()]] + [
    legacy_create(with_rid=True),
    _legacy_view(
        {("d", "a"): {"aid": AID, "node": None, "owner": CALLER, "meta": None, "detached": False}}
    ),
    {"oid": OID},
    {"s": 0, "size": 3, "cid": "bafy"},
    {
        "op": "claim",
        "ns": "d",
        "name": "n",
        "aid": AID,
        "owner": CALLER,
        "host": None,
        "meta": META,
        "get_if_exists": True,
        "detached": False,
        "pending": True,
        "wait_s": 1.5,
    },
    {
        "ok": False,
        "existing": {"aid": AID, "node": None, "owner": CALLER, "meta": None, "detached": False},
        "holder": CALLER,
    },
    {"ops": [[1, OID]]},
    {"tid": TID, "i": 0, "timeout": None},
]

junk = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=24),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=4)
    ),
    max_leaves=8,
)


def _paths(value, path=()):
    yield path
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, (*path, key))
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield from _paths(item, (*path, index))


def _corrupt(value, path, replacement, drop):
    if not path:
        return replacement
    head, rest = path[0], path[1:]
    if isinstance(value, dict):
        out = dict(value)
        if drop and not rest:
            del out[head]
        else:
            out[head] = _corrupt(value[head], rest, replacement, drop)
        return out
    out = list(value)
    if drop and not rest:
        del out[head]
    else:
        out[head] = _corrupt(value[head], rest, replacement, drop)
    return out


@settings(max_examples=600, deadline=None)
@given(st.data())
def test_corrupted_messages_decode_or_raise_wire_error(data):
    """Any corruption of a valid message (a field replaced by arbitrary msgpack data, or
    removed) either still decodes or raises WireError: never another exception."""
    message = data.draw(st.sampled_from(VALID))
    path = data.draw(st.sampled_from(list(_paths(message))))
    drop = bool(path) and data.draw(st.booleans())
    corrupted = _corrupt(message, path, data.draw(junk), drop)
    raw = _pack(corrupted)
    for decode in DECODERS:
        try:
            decoded = decode(raw)
        except WireError:
            continue
        # what decodes re-encodes to itself (compared as bytes: a NaN option is not == itself)
        assert decode(decoded.encode()).encode() == decoded.encode()


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_random_bytes_decode_or_raise_wire_error(raw):
    for decode in DECODERS:
        try:
            decode(raw)
        except WireError:
            pass


@settings(max_examples=200, deadline=None)
@given(
    tid=st.binary(min_size=16, max_size=16),
    nret=st.integers(-1, 100),
    name=st.text(max_size=40),
    opts=st.dictionaries(
        st.text(max_size=8), st.integers(-(2**63), 2**63 - 1) | st.text(max_size=4), max_size=5
    ),
    blob=st.none() | st.binary(max_size=64),
    again=st.booleans(),
    got=st.none() | st.integers(0, 1000),
    positional=st.lists(st.binary(max_size=16).map(lambda b: [0, b]), max_size=4),
)
def test_submit_task_round_trips(tid, nret, name, opts, blob, again, got, positional):
    message = SubmitTask(tid, FN, name, nret, ["l", positional, {}], opts, blob, again, got)
    assert wire.decode_task_request(message.encode()) == message


def test_a_failed_encode_leaves_the_threads_packer_clean():
    with pytest.raises(TypeError):
        AckItems(TID, object()).encode()  # type: ignore[arg-type]
    assert AckItems(TID, 1).encode() == _pack({"k": "ack", "tid": TID, "n": 1})


def test_each_thread_packs_with_its_own_packer():
    import threading

    out = {}

    def pack_many(index):
        out[index] = [AckItems(TID, n).encode() for n in range(2000)]

    threads = [threading.Thread(target=pack_many, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    expected = [_pack({"k": "ack", "tid": TID, "n": n}) for n in range(2000)]
    assert all(out[i] == expected for i in range(4))


def test_worker_output_travels_on_the_session_and_is_bounded():
    out = wire.WorkerOutput(b"\x93batch")
    assert wire.decode_task_reply(out.encode()) == out
    too_big = msgpack.packb({"k": "log", "b": b"x" * (wire.MAX_CONTROL_MESSAGE + 1)})
    with pytest.raises(wire.WireError, match="'b'"):
        wire.decode_task_reply(too_big)
    with pytest.raises(wire.WireError):
        wire.decode_task_reply(msgpack.packb({"k": "log", "b": "not bytes"}))
