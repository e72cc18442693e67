"""The ``latticaray`` command: run a node, or start/stop/inspect a local mesh of node processes.

    latticaray node --listen /ip4/0.0.0.0/udp/4001/quic-v1 --bootstrap /ip4/.../p2p/12D3KooW... \\
                    --identity ~/.latticaray/identity.key
    latticaray up --nodes 3 [--run-dir DIR]      # N node processes on loopback, state under DIR
    latticaray status [--run-dir DIR] [--check]  # processes, peers; --check: RPC among all pairs
    latticaray down [--run-dir DIR]              # stops, by PID, only what `up` started
    latticaray status | list KIND | dashboard    # a running mesh as a node of this host sees it
                                                 # (cli_observe.py)

Subcommands are argparse subparsers, so more (``microbenchmark``, ``invite``) plug in the same way.

A local mesh made by ``up`` has an *admin key* in its run directory; its nodes accept the
``/latticaray/admin/1`` service only from that key's peer ID (``--admin``), which is how
``status`` asks each node about its peers and has every node ping every other one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import msgpack

__all__ = ["build_parser", "main", "mesh_down", "mesh_status", "mesh_up"]

log = logging.getLogger("latticaray.cli")

ADMIN_PROTOCOL = "/latticaray/admin/1"
ECHO_PROTOCOL = "/latticaray/echo/1"
STATE_FILE = "mesh.json"
ADMIN_KEY_FILE = "admin.key"
MAX_ADMIN_ADDRS = 256


def default_run_dir() -> Path:
    env = os.environ.get("LATTICARAY_RUN_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_RUNTIME_DIR") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "latticaray" / "mesh"


# --- logging ---------------------------------------------------------------------------------------


class _KeyValueFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        msg = record.getMessage().replace('"', "'")
        line = (
            f"ts={ts}.{int(record.msecs):03d}Z level={record.levelname.lower()} "
            f'logger={record.name} msg="{msg}"'
        )
        if record.exc_info:
            line += ' exc="' + self.formatException(record.exc_info).replace("\n", " | ") + '"'
        return line


def _setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_KeyValueFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper(), logging.WARNING))
    logging.getLogger("latticaray.cli").setLevel(logging.INFO)


def _run(coro):
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


# --- `latticaray node` -----------------------------------------------------------------------------


def _register_node_services(node, admins: set) -> None:
    from .mesh.errors import RpcError
    from .mesh.identity import PeerId
    from .mesh.multiaddr import Multiaddr

    async def echo(ctx, payload: bytes) -> bytes:
        return payload

    async def admin(ctx, payload: bytes) -> bytes:
        if ctx.peer_id not in admins:
            raise RpcError("PERMISSION_DENIED", "admin service is restricted to the mesh admin")
        try:
            request = msgpack.unpackb(
                payload,
                raw=False,
                max_array_len=MAX_ADMIN_ADDRS,
                max_str_len=4096,
                max_bin_len=4096,
                max_map_len=8,
            )
            op = request["op"]
        except Exception as exc:
            raise RpcError(
                "INVALID_ARGUMENT", "admin request must be a msgpack map with 'op'"
            ) from exc
        if op == "info":
            return msgpack.packb(
                {
                    "peer_id": str(node.peer_id),
                    "listen": [str(a) for a in node.listen_addrs],
                    "peers": [str(p) for p in node.connected_peers()],
                    "pid": os.getpid(),
                }
            )
        if op == "ping":
            results = {}

            async def ping_one(entry):
                name = "?"
                try:
                    name, addrs = str(entry[0]), list(entry[1])[:16]
                    peer = PeerId.from_string(name)
                    node.add_addrs(peer, [Multiaddr.parse(a) for a in addrs])
                    rtt = await node.ping(peer, timeout=10)  # dials by peer ID if needed
                    probe = b"hello " + name.encode()
                    ok = await node.call(peer, ECHO_PROTOCOL, probe, timeout=10) == probe
                    results[name] = {
                        "ok": ok,
                        "rtt_ms": round(rtt * 1000, 3),
                        "transport": node.connection_to(peer).transport,
                    }
                except Exception as exc:
                    results[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}

            await asyncio.gather(*(ping_one(e) for e in request.get("peers", [])[:MAX_ADMIN_ADDRS]))
            return msgpack.packb(results)
        raise RpcError("INVALID_ARGUMENT", f"unknown admin op {op!r}")

    node.register_unary(ECHO_PROTOCOL, echo)
    node.register_unary(ADMIN_PROTOCOL, admin)


def _write_ready_file(path: str, info: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(info, fh)
    os.replace(tmp, path)


async def _node_main(args) -> int:
    from .mesh.identity import PeerId
    from .mesh.node import MeshConfig, MeshNode

    listen = args.listen or ["/ip4/127.0.0.1/udp/0/quic-v1", "/ip4/127.0.0.1/tcp/0"]
    config = MeshConfig(listen=listen, bootstrap=args.bootstrap or [], key_path=args.identity)
    if args.transports:
        config.transports = tuple(t.strip() for t in args.transports.split(",") if t.strip())
    node = MeshNode(config)
    admins = {PeerId.from_string(a) for a in (args.admin or [])}
    _register_node_services(node, admins)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await node.start()
    info = {
        "peer_id": str(node.peer_id),
        "listen": [str(a) for a in node.listen_addrs],
        "pid": os.getpid(),
    }
    log.info(
        "node started peer_id=%s listen=%s",
        node.peer_id,
        ",".join(str(a) for a in node.listen_addrs),
    )
    if args.ready_file:
        _write_ready_file(args.ready_file, info)
    else:
        print(json.dumps(info), flush=True)
    await stop.wait()
    log.info("node stopping peer_id=%s", node.peer_id)
    try:
        await asyncio.wait_for(node.stop(), 10)
    except TimeoutError:
        log.warning("node stop took over 10 s; exiting anyway")
    return 0


def cmd_node(args) -> int:
    _setup_logging(args.log_level)
    return _run(_node_main(args))


# --- local mesh: up / down / status ------------------------------------------------------------------


def _state_path(run_dir: Path) -> Path:
    return run_dir / STATE_FILE


def _load_state(run_dir: Path) -> dict | None:
    try:
        return json.loads(_state_path(run_dir).read_text())
    except FileNotFoundError:
        return None


def _write_state(run_dir: Path, state: dict) -> None:
    tmp = _state_path(run_dir).with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=1))
    os.replace(tmp, _state_path(run_dir))


def _pid_is_our_node(pid: int, run_dir: Path) -> bool:
    """True if ``pid`` is alive and is a node process started for ``run_dir``."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        try:
            os.kill(pid, 0)
        except OSError:
            return False
        return True  # no /proc: trust the PID file
    args = [a.decode(errors="replace") for a in cmdline]
    return "node" in args and any(str(run_dir) in a for a in args)


def mesh_up(
    nodes: int,
    run_dir: Path,
    *,
    transports: str | None = None,
    timeout: float = 60.0,
    log_level: str = "warning",
) -> dict:
    """Start ``nodes`` node processes on loopback; returns the mesh state (also in mesh.json)."""
    from .mesh.identity import KeyPair

    run_dir = Path(run_dir).resolve()
    existing = _load_state(run_dir)
    if existing and any(_pid_is_our_node(n["pid"], run_dir) for n in existing["nodes"]):
        raise SystemExit(f"a mesh is already running in {run_dir}; run `latticaray down` first")
    run_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(run_dir, 0o700)
    admin = KeyPair.load_or_create(run_dir / ADMIN_KEY_FILE)
    state = {"run_dir": str(run_dir), "admin": str(admin.peer_id), "nodes": []}
    try:
        _spawn_nodes(nodes, run_dir, state, admin, transports, timeout, log_level)
    except BaseException:
        mesh_down(run_dir)  # stop what this call started (the state file lists only those)
        raise
    return state


def _spawn_nodes(
    nodes: int,
    run_dir: Path,
    state: dict,
    admin,
    transports: str | None,
    timeout: float,
    log_level: str,
) -> None:
    bootstrap: list[str] = []
    for index in range(nodes):
        node_dir = run_dir / f"node{index}"
        node_dir.mkdir(exist_ok=True)
        ready = node_dir / "ready.json"
        if ready.exists():
            ready.unlink()
        cmd = [
            sys.executable,
            "-m",
            "latticaray",
            "node",
            "--identity",
            str(node_dir / "identity.key"),
            "--ready-file",
            str(ready),
            "--admin",
            str(admin.peer_id),
            "--log-level",
            log_level,
        ]
        if transports:
            cmd += ["--transports", transports]
        for addr in bootstrap:
            cmd += ["--bootstrap", addr]
        with open(node_dir / "node.log", "ab") as logfile:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=logfile,
                stderr=logfile,
                start_new_session=True,
                close_fds=True,
            )
        entry = {"index": index, "pid": proc.pid, "dir": str(node_dir)}
        state["nodes"].append(entry)
        _write_state(run_dir, state)  # record the PID at once, so `down` can always stop it
        deadline = time.monotonic() + timeout
        while not ready.exists():
            if proc.poll() is not None:
                raise SystemExit(
                    f"node {index} exited with code {proc.returncode}; see {node_dir / 'node.log'}"
                )
            if time.monotonic() > deadline:
                raise SystemExit(f"node {index} did not start within {timeout:.0f} s")
            time.sleep(0.05)
        info = json.loads(ready.read_text())
        entry.update(peer_id=info["peer_id"], listen=info["listen"])
        _write_state(run_dir, state)
        if not bootstrap:
            bootstrap = [a for a in info["listen"] if "/udp/" in a][:1] or info["listen"][:1]


def mesh_down(run_dir: Path, timeout: float = 10.0) -> list[int]:
    """Stop the processes ``up`` started for ``run_dir`` (SIGTERM, then SIGKILL); returns PIDs."""
    run_dir = Path(run_dir).resolve()
    state = _load_state(run_dir)
    if not state:
        return []
    stopped = []
    live = [n["pid"] for n in state["nodes"] if _pid_is_our_node(n["pid"], run_dir)]
    for pid in live:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    for pid in live:
        while _pid_is_our_node(pid, run_dir) and not _reap(pid):
            if time.monotonic() > deadline:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                _wait_gone(pid, run_dir, 5.0)
                break
            time.sleep(0.05)
        stopped.append(pid)
    _state_path(run_dir).unlink(missing_ok=True)
    return stopped


def _reap(pid: int) -> bool:
    """Reap ``pid`` if it is our child and has exited (so it does not linger as a zombie)."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == pid
    except ChildProcessError:
        return False


def _wait_gone(pid: int, run_dir: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while _pid_is_our_node(pid, run_dir) and not _reap(pid) and time.monotonic() < deadline:
        time.sleep(0.05)


async def _admin_calls(state: dict, run_dir: Path, check: bool) -> dict:
    from .mesh.identity import KeyPair, PeerId
    from .mesh.node import MeshConfig, MeshNode

    admin_key = KeyPair.load(Path(run_dir) / ADMIN_KEY_FILE)
    client = MeshNode(
        MeshConfig(
            key=admin_key,
            listen=["/ip4/127.0.0.1/udp/0/quic-v1"],
            transports=("quic", "tcp"),
            auto_identify=False,
        )
    )
    await client.start()
    report: dict = {}
    try:
        nodes = [n for n in state["nodes"] if "peer_id" in n]
        for n in nodes:
            client.add_addrs(PeerId.from_string(n["peer_id"]), n["listen"])

        async def ask(n, request):
            reply = await client.call(
                PeerId.from_string(n["peer_id"]), ADMIN_PROTOCOL, msgpack.packb(request), timeout=30
            )
            return msgpack.unpackb(reply, raw=False)

        async def one(n):
            entry: dict = {}
            try:
                entry["info"] = await ask(n, {"op": "info"})
                if check:
                    others = [[o["peer_id"], o["listen"]] for o in nodes if o is not n]
                    entry["ping"] = await ask(n, {"op": "ping", "peers": others})
            except Exception as exc:
                entry["error"] = f"{type(exc).__name__}: {exc}"
            report[n["index"]] = entry

        await asyncio.gather(*(one(n) for n in nodes))
    finally:
        await client.stop()
    return report


def mesh_status(run_dir: Path, check: bool = False) -> tuple[dict | None, dict]:
    run_dir = Path(run_dir).resolve()
    state = _load_state(run_dir)
    if not state:
        return None, {}
    for n in state["nodes"]:
        n["alive"] = _pid_is_our_node(n["pid"], run_dir)
    report: dict = {}
    if any(n["alive"] for n in state["nodes"]):
        report = _run(_admin_calls(state, run_dir, check))
    return state, report


def cmd_up(args) -> int:
    run_dir = Path(args.run_dir or default_run_dir())
    state = mesh_up(args.nodes, run_dir, transports=args.transports, timeout=args.timeout)
    print(f"started {len(state['nodes'])} nodes (run dir {state['run_dir']})")
    for n in state["nodes"]:
        print(f"  node{n['index']}  pid {n['pid']:>7}  {n['peer_id']}")
        for addr in n["listen"]:
            print(f"      {addr}")
    return 0


def cmd_down(args) -> int:
    run_dir = Path(args.run_dir or default_run_dir())
    stopped = mesh_down(run_dir)
    print(f"stopped {len(stopped)} node processes" + (f": {stopped}" if stopped else ""))
    return 0


def cmd_status(args) -> int:
    from latticaray import cli_observe

    run_dir = Path(args.run_dir or default_run_dir())
    if args.address or (not args.run_dir and _load_state(run_dir.resolve()) is None):
        # not a mesh `up` started: the mesh as a node of this host (or --address) knows it
        try:
            return cli_observe.run_mesh_status(args.address, args.timeout)
        except cli_observe.CliError as exc:
            print(f"no mesh in {run_dir.resolve()}; {exc}")
            return 1
    state, report = mesh_status(run_dir, check=args.check)
    if state is None:
        print(f"no mesh in {run_dir.resolve()}")
        return 1
    failures = 0
    for n in state["nodes"]:
        entry = report.get(n["index"], {})
        peers = len(entry.get("info", {}).get("peers", [])) if "info" in entry else "?"
        status = "running" if n["alive"] else "stopped"
        print(
            f"node{n['index']}  pid {n['pid']:>7}  {status:8}  peers {peers}  {n.get('peer_id', '')}"
        )
        if "error" in entry:
            failures += 1
            print(f"    error: {entry['error']}")
        for peer, result in sorted(entry.get("ping", {}).items()):
            if result.get("ok"):
                print(f"    -> {peer}: ok over {result['transport']}, rtt {result['rtt_ms']} ms")
            else:
                failures += 1
                print(f"    -> {peer}: FAILED {result.get('error', 'wrong echo')}")
        if not n["alive"]:
            failures += 1
    return 1 if failures else 0


# --- entry point -------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="latticaray", description="latticaray: tasks and actors over a p2p mesh"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("node", help="run a mesh node in the foreground")
    p.add_argument(
        "--listen",
        action="append",
        metavar="MULTIADDR",
        help="address to listen on (repeatable; default loopback QUIC + TCP)",
    )
    p.add_argument(
        "--bootstrap",
        action="append",
        metavar="MULTIADDR",
        help="peer to connect to at start, with /p2p/<id> (repeatable)",
    )
    p.add_argument(
        "--identity",
        metavar="PATH",
        help="host key file (created with mode 0600 if missing; default: fresh key)",
    )
    p.add_argument("--transports", metavar="LIST", help="e.g. 'quic,tcp' (preference order)")
    p.add_argument(
        "--admin",
        action="append",
        metavar="PEER_ID",
        help="peer allowed to use the admin service (set by `up`)",
    )
    p.add_argument("--ready-file", metavar="PATH", help="write peer id and addresses here")
    p.add_argument("--log-level", default="warning")
    p.set_defaults(func=cmd_node)

    p = sub.add_parser("up", help="start a local mesh of node processes on loopback")
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument(
        "--run-dir", metavar="DIR", help=f"state directory (default {default_run_dir()})"
    )
    p.add_argument("--transports", metavar="LIST")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for each node")
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("down", help="stop the node processes `up` started (by PID)")
    p.add_argument("--run-dir", metavar="DIR")
    p.set_defaults(func=cmd_down)

    p = sub.add_parser(
        "status",
        help="show the mesh a node of this host knows (nodes, paths, resources, work), "
        "or a mesh `up` started (--run-dir; --check runs RPC among all pairs)",
    )
    p.add_argument("--run-dir", metavar="DIR")
    p.add_argument("--check", action="store_true", help="have every node ping every other")
    p.add_argument("--address", metavar="unix:PATH", help="the node to ask (default: this host's)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for members")
    p.set_defaults(func=cmd_status)

    from latticaray import cli_observe

    cli_observe.add_parsers(sub)

    p = sub.add_parser(
        "start",
        add_help=False,
        help="run a worker node (mesh + worker pool) in the foreground; "
        "`latticaray start --help` for its options",
    )
    p.set_defaults(func=_passthrough("latticaray.runtime.node_main"))

    p = sub.add_parser("invite", help="print a membership credential signed by the mesh key")
    p.add_argument(
        "--mesh-key-path",
        required=True,
        metavar="PATH",
        help="the mesh key file (created with mode 0600 if missing)",
    )
    p.add_argument("--peer-id", help="bind the credential to this peer ID (default: any holder)")
    p.add_argument(
        "--ttl",
        type=float,
        help="validity in seconds (default one day; members renew theirs before it runs out)",
    )
    p.add_argument(
        "--role",
        default="member",
        choices=("member", "worker", "driver", "observer"),
        help="worker: execute and host work (and submit what it makes); driver: submit work; "
        "observer: read only; member: all of it (the default)",
    )
    p.set_defaults(func=cmd_invite)

    p = sub.add_parser(
        "revoke",
        help="revoke a member (or a credential): signed by the mesh key, spread to the mesh "
        "through a node",
    )
    p.add_argument("peer", nargs="?", help="peer ID of the member to revoke")
    p.add_argument("--mesh-key-path", required=True, metavar="PATH", help="the mesh key file")
    p.add_argument(
        "--credential",
        metavar="CRED",
        help="revoke this credential (its text, or its id in hex) whoever shows it",
    )
    p.add_argument(
        "--address",
        metavar="unix:PATH",
        help="a member node's driver socket (its `driver_address`): the revocation is "
        "spread from there; without it the revocation is only printed",
    )
    p.set_defaults(func=cmd_revoke)

    p = sub.add_parser(
        "microbenchmark",
        add_help=False,
        help="the rows of `ray microbenchmark` on an embedded local mesh",
    )
    p.set_defaults(func=_passthrough("latticaray.runtime.microbenchmark"))
    return parser


def _passthrough(module: str):
    """A subcommand whose arguments belong to another module's own ``main(argv)``."""

    def run(args: argparse.Namespace) -> int:
        import importlib

        return importlib.import_module(module).main(args.rest) or 0

    return run


def cmd_invite(args: argparse.Namespace) -> int:
    from latticaray.runtime.admission import make_invite

    kwargs = {} if args.ttl is None else {"ttl": args.ttl}
    print(make_invite(args.mesh_key_path, peer_id=args.peer_id, role=args.role, **kwargs))
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    from latticaray.runtime.admission import credential_id, make_revocation
    from latticaray.runtime.errors import CredentialError

    cred = None
    if args.credential:
        text = args.credential.strip()
        try:
            cred = credential_id(text) if text.startswith("lrc1.") else bytes.fromhex(text)
        except (CredentialError, ValueError) as exc:
            print(f"latticaray revoke: --credential: {exc}", file=sys.stderr)
            return 2
    if args.peer is None and cred is None:
        print("latticaray revoke: name a PEER, a --credential, or both", file=sys.stderr)
        return 2
    try:
        revocation = make_revocation(args.mesh_key_path, args.peer, cred)
    except CredentialError as exc:
        print(f"latticaray revoke: {exc}", file=sys.stderr)
        return 2
    if args.address:
        import latticaray as lattica

        lattica.init(address=args.address)
        try:
            lattica.revoke(revocation=revocation)
        finally:
            lattica.shutdown()
    print(revocation)
    return 0


def main(argv: list[str] | None = None) -> int:
    args, rest = build_parser().parse_known_args(argv)
    if rest and args.command not in ("start", "microbenchmark"):
        build_parser().parse_args(argv)  # reports the unknown arguments and exits
    args.rest = rest
    if args.command != "node":
        logging.basicConfig(level=logging.WARNING)
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
