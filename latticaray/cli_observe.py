"""The CLI's views of a running mesh: ``status``, ``list``, ``dashboard``, ``get`` and ``put``.

These attach to a node on this host (``--address unix:PATH``, ``LATTICARAY_ADDRESS``, or the one
node process found under the temp directory) and read the mesh as that node knows it; any member
shows the members it knows, no head node is needed.

    latticaray status [--address unix:PATH]                  # nodes, paths, resources, work
    latticaray list nodes|links|tasks|actors|objects|transfers [--filter state=RUNNING]
                    [--limit N] [--detail] [--format table|json]
    latticaray dashboard [--port 8265] [--host 127.0.0.1]    # serves until Ctrl-C
    latticaray get CID -o FILE [--timeout S]                  # with a progress bar
    latticaray put FILE                                       # prints the CID

``put`` stores the file's bytes (a ``bytes`` value, as ``latticaray.put(data)`` would) in the
node's object store; the node itself holds it until it stops, and any member can ``get`` it by
the CID printed. ``get`` fetches a CID through the node (a bar over the transfer after 1 s, as
``latticaray.get`` shows in a terminal or notebook) and writes the value's bytes: ``bytes``,
``bytearray``, a contiguous NumPy array (its buffer) or ``str`` (UTF-8). Bars are quiet when
stderr is not a terminal (``LATTICARAY_PROGRESS=1`` forces them).

``latticaray status`` keeps its older meaning for a mesh ``latticaray up`` started: with
``--run-dir``, or when the default run directory holds one, it shows that mesh (cli.py).
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import json
import os
import re
import sys
import tempfile
from collections.abc import Callable
from typing import Any

from latticaray.observe import query, text
from latticaray.observe.gather import MeshSnapshot

__all__ = [
    "add_parsers",
    "find_local_nodes",
    "parse_filter",
    "resolve_address",
    "run_mesh_status",
]

_FILTER = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(!=|<=|>=|=|<|>)\s*(.*?)\s*$")


class CliError(Exception):
    """A user-facing error: printed without a traceback, exit status 1."""


def parse_filter(item: str) -> tuple[str, str, str]:
    """``key=value``, ``key!=value``, ``key>N`` ... as a Ray filter triple."""
    match = _FILTER.match(item)
    if match is None:
        raise CliError(f"bad filter {item!r}: use KEY=VALUE, KEY!=VALUE, KEY>N, KEY<N, ...")
    return match[1], match[2], match[3]


def find_local_nodes() -> list[str]:
    """Driver sockets of the node processes of this user on this host that are alive."""
    found = []
    pattern = os.path.join(tempfile.gettempdir(), f"latticaray-{os.getuid()}", "node-*.sock")
    for path in sorted(glob.glob(pattern)):
        match = re.search(r"node-(\d+)\.sock$", path)
        if match is None:
            continue
        try:
            os.kill(int(match[1]), 0)
        except ProcessLookupError:
            continue
        except PermissionError:
            pass
        found.append(f"unix:{path}")
    return found


def resolve_address(address: str | None) -> str:
    """The node to attach to: the option, LATTICARAY_ADDRESS, or the single local node."""
    address = address or os.environ.get("LATTICARAY_ADDRESS")
    if address:
        return address
    nodes = find_local_nodes()
    if not nodes:
        raise CliError(
            "no latticaray node runs on this host: start one with `latticaray start`, "
            "or pass --address unix:PATH"
        )
    if len(nodes) > 1:
        raise CliError(
            "several nodes run on this host; pick one with --address:\n  " + "\n  ".join(nodes)
        )
    return nodes[0]


SnapshotFn = Callable[[int, float], MeshSnapshot]


def _attached_snapshot(address: str) -> SnapshotFn:
    """Attach this process to the node at ``address``; a function reading snapshots through it."""
    from latticaray.util import state

    _attach(address)

    def read(limit: int, timeout: float) -> MeshSnapshot:
        return state.snapshot(limit=limit, timeout=timeout)

    return read


def _attach(address: str) -> None:
    import latticaray as lattica

    try:
        lattica.init(address=address)
    except (OSError, ConnectionError) as exc:
        raise CliError(f"cannot attach to the node at {address}: {exc}") from None


#: How the commands get their snapshots (tests replace it with a fake source's).
connect: Callable[[str], SnapshotFn] = _attached_snapshot


def run_mesh_status(address: str | None, timeout: float, out=None) -> int:
    out = out or sys.stdout
    read = connect(resolve_address(address))
    snap = read(0, timeout)
    print(text.format_status(snap), file=out)
    return 1 if snap.errors else 0


def cmd_list(args: argparse.Namespace) -> int:
    filters = [parse_filter(f) for f in args.filter or []]
    read = connect(resolve_address(args.address))
    snap = read(max(args.limit, 1), args.timeout)
    try:
        rows = query.list_rows(snap, args.kind, filters, args.limit)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    if args.format == "json":
        print(json.dumps([r.as_dict() for r in rows], indent=1))
    else:
        columns = None if args.detail else text.DEFAULT_COLUMNS[args.kind]
        print(text.format_table(rows, columns))
    for node_id, why in sorted(snap.errors.items()):
        print(f"(no report from {node_id}: {why})", file=sys.stderr)
    return 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    from latticaray.dashboard import DashboardServer

    read = connect(resolve_address(args.address))

    class Proxy:
        """The attached node's snapshots as the dashboard's source of snapshots."""

        async def __call__(self) -> MeshSnapshot:
            return await asyncio.to_thread(read, 500, 5.0)

    async def serve() -> None:
        server = DashboardServer(snapshot=Proxy(), host=args.host, port=args.port)
        url = await server.start()
        print(f"dashboard at {url} (Ctrl-C stops it)", flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await server.stop()

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        pass
    return 0


FILE_CHUNK = 8 << 20


def _value_bytes(value: Any) -> memoryview:
    """The bytes `get` writes for a value, or CliError for a value that has none."""
    if isinstance(value, str):
        return memoryview(value.encode("utf-8"))
    if isinstance(value, (bytes, bytearray, memoryview)):
        return memoryview(value).cast("B")
    if type(value).__module__ == "numpy" and type(value).__name__ == "ndarray":
        if not value.flags.c_contiguous:
            value = value.copy(order="C")
        return memoryview(value).cast("B")
    raise CliError(
        f"the object holds a {type(value).__name__}, not bytes, an array or text: "
        "read it with latticaray.get() in Python"
    )


def cmd_get(args: argparse.Namespace) -> int:
    import latticaray as lattica
    from latticaray.observe.progress import ProgressBar
    from latticaray.runtime import serialization

    if not serialization.is_cid_string(args.cid):
        raise CliError(f"{args.cid!r} is not a CID")
    _attach(resolve_address(args.address))
    try:
        value = lattica.get(args.cid, timeout=args.timeout)
    except Exception as exc:
        raise CliError(f"could not get {args.cid}: {exc}") from None
    data = _value_bytes(value)
    if args.output == "-":
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
        return 0
    partial = f"{args.output}.part"
    with ProgressBar(len(data), f"write {os.path.basename(args.output)}") as bar:
        with open(partial, "wb") as out:
            for start in range(0, len(data), FILE_CHUNK):
                out.write(data[start : start + FILE_CHUNK])
                bar.update_to(min(len(data), start + FILE_CHUNK))
        os.replace(partial, args.output)
    print(f"{args.cid} -> {args.output} ({len(data)} bytes)", file=sys.stderr)
    return 0


def cmd_put(args: argparse.Namespace) -> int:
    import latticaray as lattica
    from latticaray.observe.progress import ProgressBar
    from latticaray.runtime import context

    if not os.path.isfile(args.file) or not os.access(args.file, os.R_OK):
        raise CliError(f"cannot read {args.file}: not a readable file")
    _attach(resolve_address(args.address))
    chunks = []
    try:
        with (
            open(args.file, "rb") as source,
            ProgressBar(os.path.getsize(args.file), f"put {os.path.basename(args.file)}") as bar,
        ):
            while chunk := source.read(FILE_CHUNK):
                chunks.append(chunk)
                bar.update(len(chunk))
    except OSError as exc:
        raise CliError(f"cannot read {args.file}: {exc}") from None
    data = b"".join(chunks)
    del chunks
    ref = lattica.put(data)
    del data
    cid = ref.cid
    reply = context.require_core().request({"op": "keep", "oid": ref.id})
    if "error" in reply:
        raise CliError(f"the node would not keep the object: {reply['error']!r:.200}")
    print(cid)
    return 0


def add_parsers(sub: Any) -> None:
    """The subcommands of this module, on cli.py's subparsers."""

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--address", metavar="unix:PATH", help="the node to ask (default: this host's)"
        )
        p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for members")

    p = sub.add_parser("list", help="list nodes, links, tasks, actors, objects or transfers")
    p.add_argument("kind", choices=sorted(query.KINDS))
    p.add_argument(
        "--filter",
        action="append",
        metavar="KEY=VALUE",
        help="keep rows that match (repeatable; also !=, <, <=, >, >=)",
    )
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--detail", action="store_true", help="every field, not the usual columns")
    p.add_argument("--format", choices=("table", "json"), default="table")
    common(p)
    p.set_defaults(func=_guarded(cmd_list))

    p = sub.add_parser("dashboard", help="serve the dashboard for the mesh this host's node sees")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8265)
    common(p)
    p.set_defaults(func=_guarded(cmd_dashboard))

    p = sub.add_parser("get", help="write the object a CID names to a file (with a progress bar)")
    p.add_argument("cid")
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="'-' for stdout")
    p.add_argument("--address", metavar="unix:PATH", help="the node to ask (default: this host's)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds for the whole fetch")
    p.set_defaults(func=_guarded(cmd_get))

    p = sub.add_parser("put", help="store a file's bytes in the mesh; prints its CID")
    p.add_argument("file")
    p.add_argument("--address", metavar="unix:PATH", help="the node to ask (default: this host's)")
    p.set_defaults(func=_guarded(cmd_put))


def _guarded(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except CliError as exc:
            print(f"latticaray {args.command}: {exc}", file=sys.stderr)
            return 1

    return run
