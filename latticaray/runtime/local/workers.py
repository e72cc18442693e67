"""The node's worker processes and attached drivers: spawning, channels, requests, deaths.

Task workers form a pool sized to the node's CPUs (`max_workers`): a task goes to an idle one,
and a worker blocked in `get`/`wait` lends its CPU to a new one meanwhile (as Ray does). An
actor has a worker of its own. Each worker is a `python -m latticaray.runtime.worker` child
on a Unix socketpair (protocol.py frames); attached drivers connect to the node's Unix socket
and speak the same client vocabulary. A worker that dies takes its holds with it, and its
tasks are retried or failed (local/tasks.py), its actor restarted (local/actors.py).
"""

from __future__ import annotations

import asyncio
import collections
import os
import socket
import subprocess
import sys
from typing import TYPE_CHECKING

from latticaray.runtime import serialization
from latticaray.runtime.errors import WorkerCrashedError
from latticaray.runtime.local.clients import AttachedDriver, WorkerHandle
from latticaray.runtime.local.records import PENDING
from latticaray.runtime.protocol import ChannelClosed, read_frame
from latticaray.runtime.serialization import error_blob

if TYPE_CHECKING:
    from latticaray.runtime.node import RuntimeNode

BLOCKING_REQUESTS = ("get", "wait", "stream_next")


class WorkerPool:
    """Task workers (busy and idle), the spawning of every worker, and the driver socket."""

    def __init__(self, node: RuntimeNode, max_workers: int, prestart: int):
        self.node = node
        self.max_active = max_workers
        self.prestart = prestart
        self.task_workers: list[WorkerHandle] = []
        self.idle: collections.deque[WorkerHandle] = collections.deque()
        self.starting = 0
        self._seq = 0
        self._readers: set[asyncio.Task] = set()
        self._driver_server: asyncio.AbstractServer | None = None

    def start(self) -> None:
        for _ in range(self.prestart):
            self.spawn_task_worker()

    def all_workers(self) -> list[WorkerHandle]:
        return list(self.task_workers) + self.node.actors.workers()

    def pids(self) -> list[int]:
        return [w.proc.pid for w in self.all_workers() if w.alive]

    def running(self) -> int:
        return sum(len(w.tasks) for w in self.task_workers)

    async def stop(self) -> None:
        loop = asyncio.get_running_loop()
        workers = self.all_workers()
        for worker in workers:
            worker.alive = False
            worker.kill()
        deadline = loop.time() + 5.0
        for worker in workers:
            # a child's exit is not an asyncio event here (Popen): poll, bounded by the deadline
            while worker.proc.poll() is None and loop.time() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
            try:
                if worker.writer is not None:
                    worker.writer.close()
            except Exception:
                pass
        if self._driver_server is not None:
            self._driver_server.close()
        for task in list(self._readers):
            task.cancel()
        if self._readers:
            await asyncio.gather(*self._readers, return_exceptions=True)

    # ------------------------------------------------------------------ spawning
    def spawn(self, is_actor: bool) -> WorkerHandle:
        node = self.node
        self._seq += 1
        worker_id = f"{node.node_id[-8:]}-w{self._seq}"
        parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        env = dict(os.environ)
        env.update(node.worker_env)
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "latticaray.runtime.worker",
                str(child_sock.fileno()),
                node.node_id,
                worker_id,
            ],
            pass_fds=(child_sock.fileno(),),
            env=env,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        child_sock.close()
        parent_sock.setblocking(False)
        worker = WorkerHandle(worker_id, proc, None, is_actor)
        self._keep(asyncio.get_running_loop().create_task(self._connect(worker, parent_sock)))
        return worker

    def spawn_task_worker(self) -> None:
        worker = self.spawn(is_actor=False)
        self.task_workers.append(worker)
        self.starting += 1

    def grow(self, queued: int) -> None:
        """No idle worker for ``queued`` ready tasks: start one more if the pool may grow."""
        active = sum(1 for w in self.task_workers if not w.blocked)
        if active < self.max_active and self.starting < queued:
            self.spawn_task_worker()

    def _keep(self, task: asyncio.Task) -> None:
        self._readers.add(task)
        task.add_done_callback(self._readers.discard)

    async def _connect(self, worker: WorkerHandle, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=1 << 20, loop=loop)
        protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
        transport, _ = await loop.connect_accepted_socket(lambda: protocol, sock=sock)
        worker.attach(asyncio.StreamWriter(transport, protocol, reader, loop))
        await self._read(worker, reader)

    async def _read(self, worker: WorkerHandle, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                message = await read_frame(reader)
                self._on_message(worker, message)
        except (ChannelClosed, ConnectionError):
            pass
        except asyncio.CancelledError:
            return
        self._on_died(worker)

    def _on_message(self, worker: WorkerHandle, message: dict) -> None:
        node = self.node
        op = message["op"]
        if op == "done":
            node.tasks.on_done(worker, message)
        elif op == "yield":
            node.streams.item(message)
        elif op == "hello":
            worker.ready = True
            if not worker.is_actor:
                self.starting -= 1
                self.idle.append(worker)
                node.tasks.dispatch()
        elif op == "actor_ready":
            node.actors.on_ready(worker, message)
        elif "rid" in message:
            node.spawn(self._serve_request(worker, message))
        else:
            node.handle_post(message, worker)

    # ------------------------------------------------------------------ requests
    async def _serve_request(self, client: WorkerHandle | AttachedDriver, message: dict) -> None:
        blocked = False
        if (
            message["op"] in BLOCKING_REQUESTS
            and not client.is_actor
            and not self._request_ready(message)
        ):
            blocked = self._block(client)
        try:
            reply = await self.node.handle_request(message, client)
        except Exception as exc:  # a bug must not kill the node: report it to the worker
            reply = {"error": error_blob(RuntimeError(f"node failed to serve request: {exc!r}"))}
        finally:
            if blocked:
                client.blocked -= 1
        reply["op"] = "reply"
        reply["rid"] = message["rid"]
        client.send(reply)

    def _request_ready(self, message: dict) -> bool:
        if message["op"] != "get":
            return False
        entries = self.node.objects.entries
        for oid, _owner in message["oids"]:
            entry = entries.get(oid)
            if entry is None or entry.status == PENDING:
                return False
        return True

    def _block(self, worker: WorkerHandle | AttachedDriver) -> bool:
        """A task worker waits on objects: lend its CPU to other tasks meanwhile (as Ray does)."""
        worker.blocked += 1
        for tid in worker.tasks:
            self.node.tasks.lend(tid.hex())
        self.node.tasks.dispatch()
        return True

    # ------------------------------------------------------------------ deaths
    def _on_died(self, worker: WorkerHandle) -> None:
        node = self.node
        if not worker.alive and node.stopping:
            return
        worker.alive = False
        worker.kill()
        try:
            worker.proc.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            pass
        if node.stopping:
            return
        node.stats["worker_deaths"] += 1
        node.refs.client_gone(worker)
        if worker.is_actor:
            actor = worker.actor
            if actor is not None and actor.worker is worker:
                node.actors.on_worker_died(actor)
            return
        if worker in self.task_workers:
            self.task_workers.remove(worker)
        if not worker.ready:
            self.starting -= 1
        try:
            self.idle.remove(worker)
        except ValueError:
            pass
        tasks = node.tasks
        for tid, rec in list(worker.tasks.items()):
            tasks.release(tid.hex())
            rec.worker = None
            may_retry = tasks.runner_lost(
                rec,
                WorkerCrashedError(
                    f"worker running streaming task {rec.name} died after it produced items"
                ),
                WorkerCrashedError(
                    f"worker {worker.worker_id} running task {rec.name} died "
                    f"(exit code {worker.proc.returncode}) and no retries are left"
                ),
            )
            if may_retry:
                tasks.admit(rec)
        worker.tasks.clear()
        tasks.dispatch()

    # ------------------------------------------------------------------ attached drivers
    async def listen_for_drivers(self, path: str) -> str:
        """Accept drivers on a Unix socket (owner-only permissions); returns its path."""
        node = self.node
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        if os.path.exists(path):
            os.unlink(path)

        async def on_driver(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            driver = AttachedDriver(writer)
            driver.send(
                {
                    "op": "welcome",
                    "node_id": node.node_id,
                    "store": node.worker_env.get(serialization.STORE_ROOT_ENV),
                }
            )
            try:
                while True:
                    message = await read_frame(reader)
                    if "rid" in message:
                        node.spawn(self._serve_request(driver, message))
                    else:
                        node.handle_post(message, driver)
            except (ChannelClosed, ConnectionError, asyncio.CancelledError):
                pass
            driver.alive = False
            writer.close()
            if not node.stopping:
                self._driver_gone(driver)

        self._driver_server = await asyncio.start_unix_server(on_driver, path=path, limit=1 << 20)
        os.chmod(path, 0o600)
        return path

    def _driver_gone(self, driver: AttachedDriver) -> None:
        """An attached driver disconnected: its refs are released, its actors end with it."""
        node = self.node
        node.refs.client_gone(driver)
        node.resources.client_gone(driver)
        for aid in driver.owned_actors:
            node.actors.kill({"aid": aid, "no_restart": True}, None)
