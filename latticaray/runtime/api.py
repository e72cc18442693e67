"""The user API: init/shutdown, @remote functions and actor classes, get/put/wait/cancel/kill.

Behaves like Ray's API where the issue is silent. `init()` with no arguments starts an
embedded node on a background event-loop thread (so notebooks stay responsive) with worker
processes started in the background; `init(bootstrap=[...])` also joins a mesh.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import gc
import inspect
import os
import threading
import time
from typing import Any, ClassVar

from latticaray.observe.progress import TransferWatch, interactive, node_transfers
from latticaray.runtime import context, runtime_env, serialization
from latticaray.runtime.client import DriverCore, raise_error_value
from latticaray.runtime.ids import ids
from latticaray.runtime.protocol import STREAMING
from latticaray.runtime.refs import ObjectRef, ObjectRefGenerator, collecting_refs
from latticaray.scheduler.resources import normalize

_TASK_OPTIONS = {
    "num_cpus",
    "num_gpus",
    "memory",
    "resources",
    "num_returns",
    "max_retries",
    "retry_exceptions",
    "scheduling_strategy",
    "name",
    "runtime_env",
    "_generator_backpressure_num_objects",
    "label_selector",
}
_ACTOR_OPTIONS = {
    "num_cpus",
    "num_gpus",
    "memory",
    "resources",
    "max_restarts",
    "max_task_retries",
    "max_concurrency",
    "name",
    "namespace",
    "lifetime",
    "get_if_exists",
    "scheduling_strategy",
    "runtime_env",
    "label_selector",
}


class NodeAffinitySchedulingStrategy:
    """Run on the node with this id; with soft=True fall back to anywhere if it cannot."""

    def __init__(self, node_id: str, soft: bool = False):
        self.node_id = node_id
        self.soft = soft

    def to_wire(self) -> dict:
        return {"affinity": self.node_id, "soft": self.soft}


def _set_strategy(wire: dict, strategy) -> None:
    """Put a scheduling_strategy into a task's or actor's wire options (a placement group's
    goes to ``pg``: [group id, bundle index, capture child tasks])."""
    to_wire = getattr(strategy, "to_wire", None)
    if to_wire is not None and hasattr(strategy, "placement_group"):
        pg = to_wire()
        wire["pg"] = [pg["pg"], pg["bundle"], pg["capture"]]
        return
    value = _strategy_wire(strategy)
    if value is not None:
        wire["strategy"] = value


def _captured(options: dict, wire: dict) -> dict:
    """The wire options of work submitted from a task or actor of a placement group that
    captures its children: they run in the group (unless they chose a strategy)."""
    current = context.current_placement_group.get()
    if current is None or not current[2] or "scheduling_strategy" in options:
        return wire
    return {**wire, "pg": [current[0], -1, True]}


def _strategy_wire(strategy) -> Any:
    if strategy is None or strategy == "DEFAULT":
        return None
    if isinstance(strategy, str):
        if strategy != "SPREAD":
            raise ValueError(
                f"unknown scheduling_strategy {strategy!r}: use DEFAULT, SPREAD or "
                f"NodeAffinitySchedulingStrategy"
            )
        return "SPREAD"
    if isinstance(strategy, NodeAffinitySchedulingStrategy):
        return strategy.to_wire()
    raise TypeError(
        f"unsupported scheduling_strategy {strategy!r}: use DEFAULT, SPREAD, "
        "NodeAffinitySchedulingStrategy or PlacementGroupSchedulingStrategy"
    )


def _demand(options: dict, default_cpus: float) -> dict:
    demand = dict(options.get("resources") or {})
    for reserved in ("CPU", "GPU", "memory"):
        if reserved in demand:
            raise ValueError(f"use num_cpus/num_gpus/memory, not resources={{{reserved!r}: ...}}")
    demand["CPU"] = options.get("num_cpus", default_cpus)
    if options.get("num_gpus"):
        demand["GPU"] = options["num_gpus"]
    if options.get("memory"):
        demand["memory"] = options["memory"]
    return normalize(demand)


def _check_options(options: dict, allowed: set, what: str) -> None:
    unknown = set(options) - allowed
    if unknown:
        raise ValueError(f"unknown option(s) for a remote {what}: {sorted(unknown)}")
    if options.get("label_selector"):
        raise ValueError("label_selector is not supported: use resources or a placement group")
    env = runtime_env.validate(options.get("runtime_env"))
    if env and env.get("pip"):
        raise runtime_env.RuntimeEnvError(
            "runtime_env 'pip' is not supported (tasks share pooled workers of the node's "
            "interpreter); use env_vars, working_dir or py_modules"
        )


class _EnvWire:
    """A remote function's or actor class's runtime_env in wire form: its directories packaged
    into the object store once per process and core (their CIDs travel; the objects stay held
    here while the core lives)."""

    _core: Any = None
    _packager: runtime_env.Packager | None = None
    _held: ClassVar[list] = []

    @classmethod
    def of(cls, options: dict) -> dict | None:
        env = runtime_env.validate(options.get("runtime_env"))
        if not env:
            return None
        core = context.require_core()
        if cls._packager is None or cls._core is not core:
            held: list = []

            def put(data: bytes) -> str:
                ref = core.put(data)
                held.append(ref)
                return core.object_cid(ref)

            cls._core, cls._held, cls._packager = core, held, runtime_env.Packager(put)
        return cls._packager.wire(env)


def _retry_exceptions_wire(value) -> Any:
    if value is True or value is False or value is None:
        return bool(value)
    if isinstance(value, (list, tuple)) and all(isinstance(v, type) for v in value):
        return [v.__module__ + "." + v.__qualname__ for v in value]
    raise TypeError("retry_exceptions must be a bool or a list of exception classes")


def _num_returns_wire(value, is_generator: bool) -> int:
    if value is None:
        return STREAMING if is_generator else 1
    if value in ("streaming", "dynamic"):
        return STREAMING
    if isinstance(value, int) and value >= 0:
        return value
    raise ValueError(f"num_returns must be a non-negative int or 'streaming', got {value!r}")


class RemoteFunction:
    """A function turned into a task by @remote: call `.remote(...)`, tune with `.options(...)`."""

    def __init__(self, function, options: dict, _shared: dict | None = None):
        _check_options(options, _TASK_OPTIONS, "function")
        self._function = function
        self._options = options
        self._shared = _shared if _shared is not None else {}
        self._name = getattr(function, "__qualname__", "task")
        self._shared_env: dict = {}  # its runtime_env in wire form, made at the first call
        is_gen = inspect.isgeneratorfunction(function)
        wire = {
            "res": _demand(options, 1.0),
            "max_retries": int(options.get("max_retries", 3)),
            "retry_exc": _retry_exceptions_wire(options.get("retry_exceptions", False)),
        }
        _set_strategy(wire, options.get("scheduling_strategy"))
        if options.get("_generator_backpressure_num_objects"):
            wire["window"] = int(options["_generator_backpressure_num_objects"])
        self._call_opts = {
            "nret": _num_returns_wire(options.get("num_returns"), is_gen),
            "wire": wire,
        }
        self.__doc__ = getattr(function, "__doc__", None)
        self.__name__ = getattr(function, "__name__", "task")

    def _code(self) -> tuple[bytes, bytes]:
        shared = self._shared
        if "hash" not in shared:
            blob = serialization.dumps_code(self._function)
            shared["blob"], shared["hash"] = blob, serialization.code_hash(blob)
        return shared["hash"], shared["blob"]

    def remote(self, *args, **kwargs):
        core = context.require_core()
        code_hash, blob = self._code()
        opts = self._call_opts
        if "renv" not in self._shared_env:
            self._shared_env["renv"] = _EnvWire.of(self._options)
        wire = _captured(self._options, opts["wire"])
        if self._shared_env["renv"]:
            wire = {**wire, "renv": self._shared_env["renv"]}
        if wire is not opts["wire"]:
            opts = {**opts, "wire": wire}
        return core.submit_task(code_hash, blob, self._name, args, kwargs, opts)

    def options(self, **options) -> RemoteFunction:
        merged = dict(self._options)
        merged.update(options)
        return RemoteFunction(self._function, merged, self._shared)

    def __call__(self, *args, **kwargs):
        raise TypeError(
            f"remote function {self._name} cannot be called directly: "
            f"use {self.__name__}.remote(...)"
        )


def method(*, num_returns=None, concurrency_group=None):
    """Decorate an actor method to set its num_returns (as ray.method)."""
    if concurrency_group is not None:
        raise ValueError("concurrency_group is not supported: use max_concurrency")

    def decorate(fn):
        fn.__lattica_num_returns__ = num_returns
        return fn

    return decorate


def _method_meta(cls) -> dict:
    methods = {}
    is_async = False
    for name, member in inspect.getmembers(cls, predicate=inspect.isfunction):
        if name.startswith("__") and name != "__call__":
            continue
        gen = inspect.isgeneratorfunction(member) or inspect.isasyncgenfunction(member)
        if inspect.iscoroutinefunction(member) or inspect.isasyncgenfunction(member):
            is_async = True
        methods[name] = _num_returns_wire(getattr(member, "__lattica_num_returns__", None), gen)
    return {"methods": methods, "is_async": is_async, "cname": cls.__qualname__}


class ActorClass:
    """A class turned into an actor factory by @remote: `.remote(...)` creates an actor."""

    def __init__(self, cls, options: dict, _shared: dict | None = None):
        _check_options(options, _ACTOR_OPTIONS, "class")
        self._cls = cls
        self._options = options
        self._shared = _shared if _shared is not None else {}
        if "meta" not in self._shared:
            self._shared["meta"] = _method_meta(cls)

    def _code(self) -> tuple[bytes, bytes]:
        shared = self._shared
        if "hash" not in shared:
            blob = serialization.dumps_code(self._cls)
            shared["blob"], shared["hash"] = blob, serialization.code_hash(blob)
        return shared["hash"], shared["blob"]

    def options(self, **options) -> ActorClass:
        merged = dict(self._options)
        merged.update(options)
        return ActorClass(self._cls, merged, self._shared)

    def remote(self, *args, **kwargs) -> ActorHandle:
        core = context.require_core()
        options = self._options
        meta = self._shared["meta"]
        lifetime = options.get("lifetime")
        if lifetime not in (None, "detached", "non_detached"):
            raise ValueError(
                f"lifetime must be None, 'detached' or 'non_detached', got {lifetime!r}"
            )
        detached = lifetime == "detached"
        wire = {
            "resources": _demand(options, options.get("num_cpus", 0)),
            "max_restarts": int(options.get("max_restarts", 0)),
            "max_task_retries": int(options.get("max_task_retries", 0)),
            "max_concurrency": options.get("max_concurrency"),
            "is_async": meta["is_async"],
            "meta": meta,
            "name": options.get("name"),
            "namespace": options.get("namespace") or core.namespace,
            "lifetime": "detached" if detached else None,
            "get_if_exists": bool(options.get("get_if_exists")),
        }
        _set_strategy(wire, options.get("scheduling_strategy"))
        wire = _captured(options, wire)
        renv = _EnvWire.of(options)
        if renv:
            wire["renv"] = renv
        code_hash, blob = self._code()
        actor_id = ids.next_id()
        reply = core.create_actor(code_hash, blob, meta["cname"], args, kwargs, wire, actor_id)
        if reply.get("existing"):  # get_if_exists found another creator's actor: a borrow
            return _found_handle(reply, meta, wire["max_task_retries"])
        # the creator's handle: its node owns the actor and counted this handle at creation
        return ActorHandle(
            reply.get("aid", actor_id),
            reply.get("node", core.node_id),
            meta,
            wire["max_task_retries"],
            "" if detached else core.node_id,
            _held=True,
        )

    def __call__(self, *args, **kwargs):
        raise TypeError(
            f"actor class {self._cls.__qualname__} cannot be instantiated directly: "
            f"use .remote(...)"
        )


class ActorMethod:
    """`handle.method` : call `.remote(...)`, or `.options(num_returns=...)` first."""

    def __init__(self, handle: ActorHandle, name: str, nret: int):
        self._handle = handle
        self._name = name
        self._nret = nret

    def remote(self, *args, **kwargs):
        handle = self._handle
        return context.require_core().submit_actor_task(
            handle._actor_id,
            handle._node,
            self._name,
            args,
            kwargs,
            self._nret,
            handle._max_task_retries,
            self._name,
            handle._owner,
        )

    def options(self, num_returns=None, **unsupported) -> ActorMethod:
        if unsupported:
            raise ValueError(
                f"actor method options {sorted(unsupported)} are not supported (only num_returns)"
            )
        return ActorMethod(
            self._handle, self._name, _num_returns_wire(num_returns, self._nret == STREAMING)
        )

    def __call__(self, *args, **kwargs):
        raise TypeError(f"actor method {self._name} cannot be called directly: use .remote()")


class ActorHandle:
    """A handle to a live actor; serializable, usable from any task or peer of the mesh.

    The handles of a non-detached actor are counted like ObjectRefs by the node that owns the
    actor (``owner``, its creator's node; refcount.py): a copy passed to a task or an actor,
    or put inside an object, counts as a borrow, and so does each call made through a handle
    until it is done. When no handle is left and those calls are done, the actor is reclaimed
    (killed for good), as in Ray. A detached actor's handles are not counted (``owner`` "").
    """

    _counted = False  # until __init__ counted it

    def __init__(
        self,
        actor_id: bytes,
        node: str,
        meta: dict,
        max_task_retries: int = 0,
        owner: str = "",
        _held: bool = False,
    ):
        self._actor_id = actor_id
        self._node = node
        self._meta = meta
        self._max_task_retries = max_task_retries
        self._owner = owner
        if owner:
            core = context.current_core()
            if core is not None:
                if _held:  # the creator's handle: its node counted it already
                    core.add_ref(actor_id)
                else:
                    core.add_borrowed_ref(actor_id, owner)
                self._counted = True

    def __del__(self):
        if self._counted:
            core = context.current_core()
            if core is not None:
                try:
                    core.remove_ref(self._actor_id)
                    if core.prompt_releases:  # the actor is reclaimed now, not after a batch
                        core.flush_releases()
                except Exception:
                    pass

    def __getattr__(self, name: str) -> ActorMethod:
        if name.startswith("_"):
            raise AttributeError(name)
        methods = self._meta["methods"]
        if name not in methods:
            if not methods:  # a handle found by name only: its methods are not known here
                return ActorMethod(self, name, 1)
            raise AttributeError(f"actor {self._meta['cname']} has no method {name!r}")
        return ActorMethod(self, name, methods[name])

    @property
    def actor_id(self) -> str:
        return self._actor_id.hex()

    def __reduce__(self):
        if self._owner:
            found = collecting_refs()
            if found is not None:  # the runtime counts it inside the value or task arguments
                found.append([self._actor_id, self._owner])
            else:  # pickled outside the runtime's serialization: untracked, it pins the actor
                core = context.current_core()
                if core is not None:
                    core.escape_id(self._actor_id)
        return (
            ActorHandle,
            (self._actor_id, self._node, self._meta, self._max_task_retries, self._owner),
        )

    def __repr__(self) -> str:
        return f"Actor({self._meta['cname']}, {self._actor_id.hex()})"

    def __eq__(self, other) -> bool:
        return isinstance(other, ActorHandle) and other._actor_id == self._actor_id

    def __hash__(self) -> int:
        return hash(self._actor_id)


def remote(*args, **options):
    """`@remote` or `@remote(num_cpus=..., ...)` on a function or a class."""

    def make(target):
        if inspect.isclass(target):
            return ActorClass(target, options)
        if callable(target):
            return RemoteFunction(target, options)
        raise TypeError("@remote applies to functions and classes")

    if len(args) == 1 and not options and callable(args[0]):
        return make(args[0])
    if args:
        raise TypeError("@remote takes keyword options only, e.g. @remote(num_cpus=2)")
    return make


# ---------------------------------------------------------------------- init / shutdown
class _EmbeddedRuntime:
    """A node on a background event-loop thread, owned by this driver process."""

    def __init__(self):
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread: threading.Thread | None = None
        self.node: Any = None  # the RuntimeNode, once started
        self.mesh_runtime: Any = None
        self.printer: Any = None  # LogPrinter of worker output (log_to_driver)
        self.dashboard: Any = None  # DashboardServer (init(dashboard=True))
        self.timings: dict[str, float] = {}  # init()'s phases, seconds since start() began

    def start(self, make_node, start_mesh=None) -> None:
        loop: asyncio.AbstractEventLoop
        try:
            import uvloop

            loop = uvloop.new_event_loop()
        except ImportError:
            loop = asyncio.new_event_loop()
        self.loop = loop
        started = threading.Event()

        def run():
            asyncio.set_event_loop(loop)
            loop.call_soon(started.set)
            loop.run_forever()

        self.thread = threading.Thread(target=run, name="latticaray-node", daemon=True)
        self.thread.start()
        began = time.monotonic()
        started.wait()
        self.node = make_node()
        self.timings["node_made_s"] = time.monotonic() - began
        asyncio.run_coroutine_threadsafe(self.node.start(), loop).result()
        self.timings["node_started_s"] = time.monotonic() - began
        if start_mesh is not None:
            try:
                self.mesh_runtime = asyncio.run_coroutine_threadsafe(
                    start_mesh(self.node), loop
                ).result()
                self.timings["mesh_started_s"] = time.monotonic() - began
            except BaseException:
                self.stop()  # the node and its loop thread do not outlive a failed init()
                raise

    def stop(self) -> None:
        loop = self.loop
        if loop is None or loop.is_closed():
            return
        try:
            if self.dashboard is not None:
                asyncio.run_coroutine_threadsafe(self.dashboard.stop(), loop).result(15)
            if self.mesh_runtime is not None:
                asyncio.run_coroutine_threadsafe(self.mesh_runtime.stop(), loop).result(15)
            asyncio.run_coroutine_threadsafe(self.node.stop(), loop).result(15)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            if self.thread is not None:
                self.thread.join(10)
            if not loop.is_running():
                loop.close()
            if self.printer is not None:
                self.printer.stop()  # what the workers printed last is shown before we return

    def start_dashboard(self, host: str, port: int) -> str:
        """Serve the dashboard for this node on its loop; returns the page's URL."""
        from latticaray.dashboard import DashboardServer

        assert self.loop is not None
        self.dashboard = DashboardServer(self.node.state_source, host=host, port=port)
        return asyncio.run_coroutine_threadsafe(self.dashboard.start(), self.loop).result(30)


_runtime: _EmbeddedRuntime | None = None
_init_lock = threading.Lock()


def default_resources(num_cpus, num_gpus, resources, memory=None) -> dict:
    total = dict(resources or {})
    total["CPU"] = float(num_cpus if num_cpus is not None else (os.cpu_count() or 1))
    if num_gpus:
        total["GPU"] = float(num_gpus)
    if memory is None:
        try:  # as Ray: 70% of this machine's memory is schedulable as "memory"
            memory = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * 0.7)
        except (ValueError, OSError):
            memory = 0
    if memory:
        total["memory"] = float(memory)
    return total


@contextlib.contextmanager
def _collector_paused():
    """The cyclic garbage collector paused while init() runs, then as it was. init() imports the
    mesh stack (hundreds of modules and classes, all long-lived) into a heap that already holds
    numpy and pyarrow: the collections those allocations set off walk all of it and free nothing
    (a full one ~20-30 ms of init()'s ~0.2 s of CPU here). The next collection runs after init()
    returns; nothing is frozen (the process is the user's, see gcpolicy.py)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def init(
    address: str | None = None,
    *,
    bootstrap: list[str] | None = None,
    credential: str | None = None,
    num_cpus: float | None = None,
    num_gpus: float | None = None,
    resources: dict | None = None,
    namespace: str = "default",
    ignore_reinit_error: bool = False,
    listen: list[str] | None = None,
    mesh_key_path: str | None = None,
    nat=None,
    log_to_driver: bool = True,
    dashboard: bool = False,
    dashboard_host: str = "127.0.0.1",
    dashboard_port: int = 8265,
    ipfs: bool = False,
    peering: str | None = None,
    object_store_memory: int | None = None,
    _mesh: bool | None = None,
    _max_workers: int | None = None,
):
    """Start (or join) latticaray from this process.

    No arguments: an embedded local node with worker processes sized to this machine.
    `bootstrap=[multiaddr, ...]` joins an existing mesh (with `credential`, a membership
    credential from the mesh's `latticaray invite`). `nat=` (a mesh_runtime.NatSettings or a dict of
    its fields: observers, relays, lab, hole_punching, ...) runs NAT traversal for a node behind a
    NAT: it reserves a relay slot, advertises its circuit address and upgrades by hole punching.

    `log_to_driver` (default on): what tasks and actors print, on any node, shows here with a
    `(name pid=..., node=...)` prefix. `dashboard=True` serves the dashboard from this node
    (`dashboard_host`:`dashboard_port`, 0 for any free port); its URL is in the returned info.

    `ipfs=True` (a mesh node; off by default) lets IPFS peers (kubo, Helia) fetch the objects
    this node shares with `latticaray.util.ipfs.share(ref)` over Bitswap 1.2.0, announced in the
    DHT; nothing that is not shared is served to non-members.

    `peering` (a mesh node): "full" (the default) admits and keeps views of every member (idle
    cost grows with the square of the mesh's size); "sparse" keeps live views of a bounded
    neighbourhood of peers (bootstrap, recently used, found through capacity ads).

    `object_store_memory` (bytes, as in Ray): this node's object store capacity in memory (default:
    a share of the machine's memory; `latticaray start --object-store-memory` for a node
    process). Objects that do not fit beside the others are spilled to disk, least recently used
    first; a single value larger than the whole store is kept in its owner's process memory
    instead (no disk-backed fallback allocation yet).
    """
    global _runtime
    began = time.monotonic()
    with _init_lock, _collector_paused():
        if _runtime is not None or _attached is not None:
            if ignore_reinit_error:
                return _runtime_info()
            raise RuntimeError(
                "latticaray.init() was already called: call shutdown() first, "
                "or pass ignore_reinit_error=True"
            )
        if context.current_core() is not None:
            raise RuntimeError("init() cannot be called inside a task or actor")
        if peering is not None and peering not in ("full", "sparse"):
            raise ValueError(f"peering is 'full' or 'sparse', not {peering!r}")
        if object_store_memory is not None and (
            isinstance(object_store_memory, bool)
            or not isinstance(object_store_memory, int)
            or object_store_memory <= 0
        ):
            raise ValueError(
                f"object_store_memory is a positive number of bytes, not {object_store_memory!r}"
            )
        address = address or os.environ.get("LATTICARAY_ADDRESS")
        if address and peering is not None:
            raise ValueError(
                "peering= is an option of the node, not of a driver attaching to it: start "
                f"that node with `latticaray start --peering {peering}`"
            )
        if address:
            if object_store_memory is not None:
                raise ValueError(
                    "object_store_memory is an option of the node, not of a driver attaching to "
                    "it: start that node with `latticaray start --object-store-memory BYTES`"
                )
            if ipfs:
                raise ValueError(
                    "ipfs=True is an option of the node, not of a driver attaching to it: start "
                    "that node with `latticaray start --ipfs`"
                )
            return _attach(address, namespace)
        use_mesh = bool(bootstrap) or bool(listen) or bool(_mesh) or bool(nat)  # nat=False: off
        use_mesh = use_mesh or bool(ipfs)  # IPFS peers reach the node's mesh transports
        if peering is not None and not use_mesh:
            raise ValueError(
                f"peering={peering!r} applies to a mesh node: pass bootstrap=, listen= or nat="
            )
        from latticaray.runtime.gpus import detect_gpus

        gpus = detect_gpus(num_gpus)  # CUDA_VISIBLE_DEVICES, NVML, or num_gpus declared
        total = default_resources(num_cpus, gpus.count, resources)
        runtime = _EmbeddedRuntime()
        start_mesh = None
        node_id = None
        if use_mesh:
            from latticaray.runtime.mesh_runtime import MeshRuntime

            mesh_runtime = MeshRuntime.prepare(
                bootstrap=bootstrap or [],
                credential=credential,
                listen=listen,
                key_path=mesh_key_path,
                nat=nat,
                ipfs=bool(ipfs),
                peering=peering or "full",
            )
            mesh_runtime.embedded = True
            node_id = mesh_runtime.node_id
            start_mesh = mesh_runtime.start
        if node_id is None:
            node_id = "local-" + os.urandom(8).hex()

        from latticaray.runtime.node import RuntimeNode

        def make_node():
            return RuntimeNode(
                node_id,
                total,
                max_workers=_max_workers,
                gpu_ids=list(gpus.ids),
                store_capacity=object_store_memory,
            )

        prepared = time.monotonic() - began
        try:
            runtime.start(make_node, start_mesh)
        except BaseException:  # a refused credential: nothing of this node stays behind
            runtime.stop()
            raise
        _runtime = runtime
        runtime.timings["prepared_s"] = prepared
        assert runtime.loop is not None
        context.set_core(DriverCore(runtime.node, runtime.loop, namespace))
        runtime.node.state_source.role = "driver"
        if log_to_driver:
            from latticaray.observe.logs import LogPrinter

            runtime.printer = LogPrinter().start()
            runtime.node.logs.sink = runtime.printer.submit
        info = _runtime_info()
        if dashboard:
            info["dashboard_url"] = runtime.start_dashboard(dashboard_host, dashboard_port)
            print(f"latticaray dashboard at {info['dashboard_url']}", flush=True)
        return info


_attached = None


def _attach(address: str, namespace: str) -> dict:
    """Attach this driver to a node process listening on a Unix socket."""
    global _attached
    from latticaray.runtime.client import AttachedCore

    path = address[len("unix:") :] if address.startswith("unix:") else address
    core = AttachedCore(path, namespace)
    if core.store_root:
        os.environ[serialization.STORE_ROOT_ENV] = core.store_root  # attached on first use
        serialization.set_store(None)
    _attached = core
    context.set_core(core)
    return {"node_id": core.node_id, "address": [f"unix:{path}"]}


def _runtime_info() -> dict:
    if _runtime is None:
        return {"node_id": _attached.node_id if _attached is not None else None, "address": []}
    return {
        "node_id": _runtime.node.node_id,
        "address": getattr(_runtime.mesh_runtime, "listen_addrs", []),
    }


def shutdown() -> None:
    """Stop the embedded node and its worker processes (idempotent)."""
    global _runtime, _attached
    with _init_lock:
        runtime, _runtime = _runtime, None
        if _attached is not None:
            _attached.shutdown()
            _attached = None
            context.set_core(None)
            serialization.set_store(None)
            os.environ.pop(serialization.STORE_ROOT_ENV, None)
        core = context.current_core()
        if isinstance(core, DriverCore):
            context.set_core(None)
        if runtime is not None:
            runtime.stop()


atexit.register(shutdown)


def mesh_info() -> dict:
    """This driver's node id and listen addresses (empty when not part of a mesh)."""
    if _runtime is None and _attached is None:
        raise RuntimeError("latticaray is not initialized: call latticaray.init() first")
    return _runtime_info()


def invite(peer_id: str | None = None, ttl: float | None = None, role: str = "member") -> str:
    """A membership credential for this mesh (only on the node that holds the mesh key):
    bound to `peer_id` if given (else a bearer invite), valid `ttl` seconds (default one day;
    a member renews its own before it runs out), with `role` ``member`` (everything),
    ``worker`` (execute, host, submit), ``driver`` (submit, read) or ``observer`` (read)."""
    if _runtime is None or _runtime.mesh_runtime is None:
        raise RuntimeError("invite() needs a mesh: init(listen=[...]) or init(_mesh=True) first")
    return _runtime.mesh_runtime.invite(peer_id, ttl, role)


def revoke(
    peer_id: str | None = None,
    *,
    credential_id: bytes | None = None,
    revocation: str | None = None,
) -> str:
    """Revoke a member (`peer_id`: whatever credential it shows) or a credential
    (`credential_id`: whoever shows it). The revocation is signed by the mesh key this node
    holds (or given signed, as `revocation`, e.g. by `latticaray revoke`), spread through the
    cluster state, and honoured by every member within a gossip round: the revoked peer's
    connections are closed and its work refused. Returns the revocation's text."""
    core = context.require_core()
    if revocation is None:
        if _runtime is None or _runtime.mesh_runtime is None:
            raise RuntimeError(
                "revoke() signs with the mesh key of an embedded mesh node; an attached driver "
                "passes revocation= (made by `latticaray revoke --mesh-key-path`)"
            )
        revocation = _runtime.mesh_runtime.admission.revocation(peer_id, credential_id)
    reply = core.request({"op": "revoke", "text": revocation})
    if "error" in reply:
        raise_error_value(reply["error"])
    return revocation


def is_initialized() -> bool:
    return context.current_core() is not None


# ---------------------------------------------------------------------- verbs
def _transfer_progress(core, what: str):
    """A progress bar over the node's incoming transfers while a driver's get() waits (after
    1 s, only when someone can see it: a terminal or a notebook); a worker's get shows none."""
    if getattr(core, "worker_id", "driver") != "driver" or not interactive():
        return contextlib.nullcontext()
    return TransferWatch(node_transfers(core.request), desc=what, enabled=True)


def get(refs, *, timeout: float | None = None):
    """Values of `refs` (one ObjectRef, a list of them, or a CID string), raising task errors."""
    core = context.require_core()
    if isinstance(refs, ObjectRef):
        with _transfer_progress(core, "get"):
            return core.get([refs], timeout)[0]
    if isinstance(refs, str):
        if not serialization.is_cid_string(refs):
            raise ValueError(f"{refs!r} is not a CID")
        with _transfer_progress(core, f"get {refs[:16]}"):
            return core.get_by_cid(refs, timeout)
    if isinstance(refs, (list, tuple)):
        for ref in refs:
            if not isinstance(ref, ObjectRef):
                raise TypeError(f"get() takes ObjectRefs, got {type(ref).__name__}")
        if not refs:
            return []
        with _transfer_progress(core, "get"):
            return core.get(list(refs), timeout)
    if isinstance(refs, ObjectRefGenerator):
        raise TypeError("iterate an ObjectRefGenerator to get its refs, then get() them")
    raise TypeError(
        f"get() takes an ObjectRef, a list of ObjectRefs or a CID string, got {type(refs).__name__}"
    )


def put(value) -> ObjectRef:
    """Store `value` in the object store; returns its ref (whose `.cid` names it mesh-wide)."""
    if isinstance(value, ObjectRef):
        raise TypeError("put() of an ObjectRef is not allowed: pass the ref itself")
    return context.require_core().put_counted(value)


def wait(
    refs: list[ObjectRef],
    *,
    num_returns: int = 1,
    timeout: float | None = None,
    fetch_local: bool = True,
) -> tuple[list[ObjectRef], list[ObjectRef]]:
    """Split `refs` into (ready, not ready) once `num_returns` are ready or `timeout` passes."""
    if isinstance(refs, ObjectRef):
        raise TypeError("wait() takes a list of ObjectRefs")
    refs = list(refs)
    if len({r.id for r in refs}) != len(refs):
        raise ValueError("wait() got duplicate ObjectRefs")
    if num_returns <= 0 or num_returns > len(refs):
        raise ValueError(f"num_returns must be between 1 and {len(refs)}")
    ready_idx = sorted(set(context.require_core().wait(refs, num_returns, timeout, fetch_local)))
    ready = [refs[i] for i in ready_idx]
    not_ready: list[ObjectRef] = []
    start = 0
    for i in ready_idx:  # the runs between the ready ones, copied as slices
        not_ready += refs[start:i]
        start = i + 1
    not_ready += refs[start:]
    return ready, not_ready


def cancel(ref: ObjectRef, *, force: bool = False, recursive: bool = True) -> None:
    """Cancel the task producing `ref`; `force` kills the worker running it."""
    if isinstance(ref, ObjectRefGenerator):
        from latticaray.runtime.ids import object_id

        ref = ObjectRef(object_id(ref.task_id(), 0), ref.owner, _count=False)
    if not isinstance(ref, ObjectRef):
        raise TypeError("cancel() takes an ObjectRef")
    context.require_core().cancel(ref, force, recursive)


def kill(actor: ActorHandle, *, no_restart: bool = True) -> None:
    """Kill an actor's worker at once; with no_restart=False it may restart (max_restarts)."""
    if not isinstance(actor, ActorHandle):
        raise TypeError("kill() takes an ActorHandle")
    context.require_core().kill_actor(actor._actor_id, actor._node, no_restart)


def get_actor(name: str, namespace: str | None = None) -> ActorHandle:
    """The handle of the live actor registered under `name` (ValueError if none)."""
    core = context.require_core()
    reply = core.get_actor(name, namespace or core.namespace)
    meta = reply.get("meta") or {"methods": {}, "is_async": False, "cname": name}
    return _found_handle(reply, meta, int(reply.get("max_task_retries", 0)))


def _found_handle(reply: dict, meta: dict, max_task_retries: int) -> ActorHandle:
    """A handle to an actor found by name: a borrow counted at its owner (unless detached, or
    its owner is not known)."""
    owner = "" if reply.get("detached") else str(reply.get("owner") or "")
    return ActorHandle(reply["aid"], reply["node"], meta, max_task_retries, owner)


def nodes() -> list[dict]:
    return context.require_core().nodes()


def _sum_resources(key: str) -> dict:
    total: dict[str, float] = {}
    for node in nodes():
        if node.get("Alive"):
            for name, amount in node.get(key, {}).items():
                total[name] = total.get(name, 0.0) + amount
    return total


def cluster_resources() -> dict:
    return _sum_resources("Resources")


def available_resources() -> dict:
    return _sum_resources("Available")


def get_runtime_context() -> context.RuntimeContext:
    return context.require_core().runtime_context()


def timeline_wait(predicate, timeout: float, interval: float = 0.01) -> bool:
    """Poll `predicate` until true or `timeout` (a helper for examples and tests)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
