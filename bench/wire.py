#!/usr/bin/env python3
"""Cost of the typed runtime wire messages (runtime/remote/wire.py) against plain maps.

For each message of the task session (and a few control messages) it times, in one process:

* ``map``    what runtime/cluster.py does today: build the dict and ``msgpack.packb`` it; then
             ``msgpack.unpackb`` and the reads its handler makes (kind dispatch, the fields used);
* ``typed``  build the dataclass and ``encode()`` it; then ``decode_*`` (every field checked)
             and the same reads as attributes, dispatched on the class.

The last two rows are the node <-> worker channel (runtime/protocol.py frames), with typed
messages prototyped here (not in the package; that channel is trusted, so they check nothing).

Both run interleaved, ``--rounds`` times each (best round kept: the machine is shared), and the
table gives microseconds per message (send + receive) and the typed layer's overhead.

    .venv/bin/python bench/wire.py [--rounds 7] [--number 20000]

The last line of output is one JSON object with every figure, the machine and the versions.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import timeit
from dataclasses import dataclass
from functools import partial

import msgpack

from latticaray.runtime import protocol
from latticaray.runtime.remote import wire

TID = os.urandom(16)
AID = os.urandom(16)
OID = TID + b"\x00\x00\x00\x00"
FN = os.urandom(16)
PEER = "12D3KooWQfGkPUkoLDEeJE3H3ZTmu9BZvAdbJpmhha8WzDeSHaAa"
OPTS = {"res": {"CPU": 1.0}, "max_retries": 3, "retry_exc": False}
ARGS_B = ["b", os.urandom(60)]
ARGS_L = ["l", [[0, os.urandom(40)], [1, OID, PEER]], {"k": [0, os.urandom(20)]}]
VALUE = os.urandom(100)


def pack(message):
    return msgpack.packb(message, use_bin_type=True)


def unpack(data):
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


# each case: (name, map_send, map_receive, typed_send, typed_receive) where the senders return
# bytes and the receivers take them and read what the handler reads
def case_task():
    def map_send():
        out = {
            "tid": TID,
            "fn": FN,
            "name": "f",
            "nret": 1,
            "args": ARGS_B,
            "opts": dict(OPTS, placed=True),
        }
        return pack({"k": "task", "m": out})

    def map_recv(data):
        message = unpack(data)
        if message.get("k") == "task":
            task = message["m"]
            return (task["tid"], task["fn"], task.get("blob"), task["args"], task["opts"])
        return None

    def typed_send():
        return wire.SubmitTask(TID, FN, "f", 1, ARGS_B, dict(OPTS, placed=True)).encode()

    def typed_recv(data):
        message = wire.decode_task_request(data)
        if isinstance(message, wire.SubmitTask):
            return (message.tid, message.fn, message.blob, message.args, message.opts)
        return None

    return "task (args b)", map_send, map_recv, typed_send, typed_recv


def case_acall():
    def map_send():
        out = {"tid": TID, "aid": AID, "m": "inc", "nret": 1, "name": "C.inc", "args": ARGS_L}
        return pack({"k": "acall", "m": out})

    def map_recv(data):
        message = unpack(data)
        if message.get("k") == "acall":
            call = message["m"]
            return (call["tid"], call["aid"], call["m"], call["args"])
        return None

    def typed_send():
        return wire.CallActor(TID, AID, "inc", 1, "C.inc", ARGS_L).encode()

    def typed_recv(data):
        message = wire.decode_task_request(data)
        if isinstance(message, wire.CallActor):
            return (message.tid, message.aid, message.m, message.args)
        return None

    return "acall (args l, 3)", map_send, map_recv, typed_send, typed_recv


def case_done():
    def map_send():
        return pack({"k": "done", "tid": TID, "vals": [VALUE]})

    def map_recv(data):
        message = unpack(data)
        if message["k"] == "done":
            return (message.get("tid"), message.get("inner"), message.get("err"), message["vals"])
        return None

    def typed_send():
        return wire.TaskDone(TID, vals=[VALUE]).encode()

    def typed_recv(data):
        message = wire.decode_task_reply(data)
        if isinstance(message, wire.TaskDone):
            return (message.tid, message.inner, message.err, message.vals)
        return None

    return "done (1 value)", map_send, map_recv, typed_send, typed_recv


def case_yield():
    def map_send():
        return pack({"k": "yield", "tid": TID, "i": 7, "d": VALUE})

    def map_recv(data):
        message = unpack(data)
        if message["k"] == "yield":
            return (message.get("tid"), message["i"], message["d"], message.get("inner"))
        return None

    def typed_send():
        return wire.YieldItem(TID, 7, VALUE).encode()

    def typed_recv(data):
        message = wire.decode_task_reply(data)
        if isinstance(message, wire.YieldItem):
            return (message.tid, message.i, message.d, message.inner)
        return None

    return "yield", map_send, map_recv, typed_send, typed_recv


def _small(kind, legacy, typed, fields):
    def map_send():
        return pack(legacy())

    def map_recv(data):
        message = unpack(data)
        if message.get("k") == kind:
            return tuple(message[f] for f in fields)
        return None

    def typed_send():
        return typed().encode()

    def typed_recv(data):
        message = wire.decode_task_request(data)
        return tuple(getattr(message, f) for f in fields)

    return kind, map_send, map_recv, typed_send, typed_recv


def case_view():
    view = {
        "total": {"CPU": 4.0, "memory": 8e9},
        "avail": {"CPU": 2.0, "memory": 4e9},
        "queued": 3,
        "running": 2,
        "peers": {PEER: ["/ip4/127.0.0.1/udp/4001/quic-v1", "/ip4/127.0.0.1/tcp/4001"]},
        "names": [],
    }

    def map_send():
        return pack(dict(view))

    def map_recv(data):
        v = unpack(data)
        return (dict(v.get("total", {})), dict(v.get("avail", {})), v.get("peers"), v["names"])

    def typed_send():
        return wire.RuntimeView(view["total"], view["avail"], 3, 2, view["peers"], []).encode()

    def typed_recv(data):
        v = wire.decode_view(data)
        return (v.total, v.avail, v.peers, v.names)

    return "runtime view", map_send, map_recv, typed_send, typed_recv


# -- the node <-> worker channel: what typed messages would cost there (a prototype, not in the
# package; the channel is trusted, so its decoders would check nothing)
@dataclass(slots=True, frozen=True)
class _RunTask:
    tid: bytes
    fn: bytes
    args: list
    nret: int
    name: str
    window: int | None = None
    blob: bytes | None = None

    def to_wire(self):
        out = {
            "op": "task",
            "tid": self.tid,
            "fn": self.fn,
            "args": self.args,
            "nret": self.nret,
            "name": self.name,
        }
        if self.window is not None:
            out["window"] = self.window
        if self.blob is not None:
            out["blob"] = self.blob
        return out

    @classmethod
    def from_wire(cls, m):
        return cls(
            m["tid"], m["fn"], m["args"], m["nret"], m["name"], m.get("window"), m.get("blob")
        )


@dataclass(slots=True, frozen=True)
class _WorkerDone:
    tid: bytes
    vals: list | None = None
    inner: list | None = None

    def to_wire(self):
        out = {"op": "done", "tid": self.tid, "vals": self.vals}
        if self.inner is not None:
            out["inner"] = self.inner
        return out

    @classmethod
    def from_wire(cls, m):
        return cls(m["tid"], m.get("vals"), m.get("inner"))


def case_worker_task():
    def map_send():  # node._run_on
        out = {"op": "task", "tid": TID, "fn": FN, "args": ARGS_B, "nret": 1, "name": "f"}
        return protocol.pack(out)

    def map_recv(data):  # worker: message["op"] dispatch, then the fields it reads
        message = protocol.unpack(data[4:])
        if message["op"] == "task":
            return (message["tid"], message["fn"], message["args"], message.get("blob"))
        return None

    def typed_send():
        return protocol.pack(_RunTask(TID, FN, ARGS_B, 1, "f").to_wire())

    def typed_recv(data):
        message = protocol.unpack(data[4:])
        if message["op"] == "task":
            task = _RunTask.from_wire(message)
            return (task.tid, task.fn, task.args, task.blob)
        return None

    return "worker: task", map_send, map_recv, typed_send, typed_recv


def case_worker_done():
    def map_send():  # worker's done
        return protocol.pack({"op": "done", "tid": TID, "vals": [VALUE]})

    def map_recv(data):  # node._on_worker_message / _on_done / _complete
        message = protocol.unpack(data[4:])
        if message["op"] == "done":
            return (message["tid"], message.get("err"), message["vals"], message.get("inner"))
        return None

    def typed_send():
        return protocol.pack(_WorkerDone(TID, [VALUE]).to_wire())

    def typed_recv(data):
        message = protocol.unpack(data[4:])
        if message["op"] == "done":
            done = _WorkerDone.from_wire(message)
            return (done.tid, None, done.vals, done.inner)
        return None

    return "worker: done", map_send, map_recv, typed_send, typed_recv


CASES = [
    case_task,
    case_acall,
    case_done,
    case_yield,
    lambda: _small(
        "ack", lambda: {"k": "ack", "tid": TID, "n": 5}, lambda: wire.AckItems(TID, 5), ("tid", "n")
    ),
    lambda: _small("held", lambda: {"k": "held", "tid": TID}, lambda: wire.RefsHeld(TID), ("tid",)),
    lambda: _small(
        "fetched",
        lambda: {"k": "fetched", "cids": ["bafy" + "x" * 55]},
        lambda: wire.ResultsFetched(["bafy" + "x" * 55]),
        ("cids",),
    ),
    case_view,
    case_worker_task,
    case_worker_done,
]


def best(fn, number: int, rounds: int) -> float:
    return min(timeit.repeat(fn, number=number, repeat=rounds)) / number * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--number", type=int, default=20000)
    args = parser.parse_args()
    rows = []
    for make in CASES:
        name, map_send, map_recv, typed_send, typed_recv = make()
        map_data, typed_data = map_send(), typed_send()
        assert map_data == typed_data, name  # byte-identical encodings
        assert map_recv(map_data) == typed_recv(typed_data), name
        timings = {"map_send": [], "map_recv": [], "typed_send": [], "typed_recv": []}
        for _ in range(args.rounds):  # interleaved: a noisy spell hits both sides alike
            timings["map_send"].append(best(map_send, args.number, 1))
            timings["typed_send"].append(best(typed_send, args.number, 1))
            timings["map_recv"].append(best(partial(map_recv, map_data), args.number, 1))
            timings["typed_recv"].append(best(partial(typed_recv, typed_data), args.number, 1))
        row = {"message": name, "bytes": len(map_data)}
        row.update({k: round(min(v), 3) for k, v in timings.items()})
        row["map_us"] = round(row["map_send"] + row["map_recv"], 3)
        row["typed_us"] = round(row["typed_send"] + row["typed_recv"], 3)
        row["overhead_us"] = round(row["typed_us"] - row["map_us"], 3)
        rows.append(row)
    header = (
        f"{'message':<20}{'bytes':>7}{'map send':>10}{'map recv':>10}{'typed send':>12}"
        f"{'typed recv':>12}{'map':>8}{'typed':>8}{'overhead':>10}"
    )
    print("microseconds per message, best of", args.rounds, "rounds of", args.number)
    print(header)
    for r in rows:
        print(
            f"{r['message']:<20}{r['bytes']:>7}{r['map_send']:>10.2f}{r['map_recv']:>10.2f}"
            f"{r['typed_send']:>12.2f}{r['typed_recv']:>12.2f}{r['map_us']:>8.2f}"
            f"{r['typed_us']:>8.2f}{r['overhead_us']:>+10.2f}"
        )
    print(
        json.dumps(
            {
                "bench": "wire",
                "rows": rows,
                "rounds": args.rounds,
                "number": args.number,
                "machine": {
                    "platform": platform.platform(),
                    "cpu_count": os.cpu_count(),
                    "note": "shared machine, loaded by other engineers' work during runs",
                },
                "versions": {
                    "python": platform.python_version(),
                    "msgpack": ".".join(map(str, msgpack.version)),
                },
            }
        )
    )


if __name__ == "__main__":
    main()
