"""Worker process: executes tasks and hosts actors for the node that spawned it.

Started as `python -m latticaray.runtime.worker <fd> <node_id> <worker_id>` with one end of a Unix
socketpair as `fd`. The main thread reads frames from the node between tasks and runs tasks
(one at a time); actor calls run on the main thread, a thread pool (max_concurrency > 1) or an
asyncio loop (async actors). User code calling the runtime API (nested tasks, get, put, actors)
goes through `WorkerCore` (client.py), which sends requests to the node over the same channel and reads the
channel itself while it waits (see channel.py). The node cancels a running task by sending
a cancel frame and SIGUSR1.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import select
import signal
import socket
import sys
import threading
import traceback
from concurrent.futures import ThreadPoolExecutor

from latticaray.runtime import context, gpus, runtime_env, serialization
from latticaray.runtime.channel import WorkerConnection
from latticaray.runtime.client import WorkerCore
from latticaray.runtime.errors import ActorDiedError, TaskCancelledError, TaskError
from latticaray.runtime.protocol import STREAMING, ChannelClosed
from latticaray.runtime.refs import collect_refs

STREAM_WINDOW = 16


class StreamCredit:
    """Backpressure for streaming tasks: a producer may run at most STREAM_WINDOW items ahead."""

    def __init__(self):
        self._consumed: dict[bytes, int] = {}
        self._cond = threading.Condition()

    def wait_for_room(self, task_id: bytes, index: int, window: int, cancelled, pump=None) -> None:
        """Wait until the consumer is close enough; `pump` reads frames (the main thread's way
        of receiving the acks it waits for)."""
        while True:
            with self._cond:
                if index - self._consumed.get(task_id, 0) < window:
                    return
                if cancelled():
                    raise KeyboardInterrupt
                if pump is None:
                    self._cond.wait(0.5)
                    continue
            pump()

    def ack(self, task_id: bytes, consumed: int) -> None:
        with self._cond:
            if consumed > self._consumed.get(task_id, 0):
                self._consumed[task_id] = consumed
            self._cond.notify_all()

    def forget(self, task_id: bytes) -> None:
        with self._cond:
            self._consumed.pop(task_id, None)


def yield_message(task_id: bytes, index: int, item) -> dict:
    """A streamed item; refs inside it are listed so the node counts them as its contents."""
    with collect_refs() as inner:
        message = {"op": "yield", "tid": task_id, "i": index, "d": serialization.serialize(item)}
    if inner:
        message["inner"] = inner
    return message


def decode_args(encoded):
    with context.require_core().borrowing():  # refs inside: one registration message
        if encoded[0] == "b":
            return serialization.deserialize(encoded[1])
        _, positional, keyword = encoded
        args = [serialization.deserialize(item[1]) for item in positional]
        kwargs = {key: serialization.deserialize(item[1]) for key, item in keyword.items()}
        return args, kwargs


def encode_error(function_name: str, exc: BaseException, node_id: str) -> tuple[bytes, list[str]]:
    if isinstance(exc, (TaskCancelledError, ActorDiedError)):
        return serialization.dumps_code(exc), [type(exc).__name__]
    if isinstance(exc, TaskError):  # a failed dependency or nested get: pass it through as is
        err = exc
    else:
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        err = TaskError(function_name, type(exc).__name__, tb, exc, node_id)
    try:
        data = serialization.dumps_code(err)
    except Exception:
        err = TaskError(function_name, type(exc).__name__, err.remote_traceback, None, node_id)
        data = serialization.dumps_code(err)
    mro = [cls.__module__ + "." + cls.__qualname__ for cls in type(exc).__mro__]
    return data, mro


class Worker:
    """Executes what the node sends; one instance per worker process."""

    def __init__(self, conn: WorkerConnection, node_id: str, worker_id: str):
        self.conn = conn
        self.node_id = node_id
        self.worker_id = worker_id
        self.code_cache: dict[bytes, object] = {}
        self.credit = StreamCredit()
        self.cancelled: set[bytes] = set()
        self.running_main: bytes | None = None
        #: The main thread's latest task, kept after it returns: output below Python (os.write,
        #: a subprocess) that the capture's pipe reader reads only after the task returned is
        #: still that task's.
        self.last_main: bytes | None = None
        self.actor = None
        self.actor_id: bytes | None = None
        self.actor_error: bytes | None = None
        self.actor_pool: ThreadPoolExecutor | None = None
        self.actor_loop: asyncio.AbstractEventLoop | None = None
        self.actor_semaphore: asyncio.Semaphore | None = None
        self.main_ident = threading.main_thread().ident
        conn.router = self.route

    # ---- frames that are not replies (routed by whichever thread read them)
    def route(self, message: dict) -> None:
        op = message["op"]
        if op == "gen_ack":
            self.credit.ack(message["tid"], message["n"])
        elif op == "cancel":
            self._cancel(message["tid"])
        elif op == "actor_call" and (self.actor_pool is not None or self.actor_loop is not None):
            self._dispatch_concurrent(message)
        else:
            self.conn.deferred.append(message)

    def _cancel(self, task_id: bytes) -> None:
        self.cancelled.add(task_id)
        if self.running_main == task_id:
            if threading.get_ident() == self.main_ident:
                raise KeyboardInterrupt  # read while the task itself waited on the node
            # a real signal, so a blocking call (sleep, socket read) in the task is interrupted
            assert self.main_ident is not None
            signal.pthread_kill(self.main_ident, signal.SIGUSR1)

    def on_cancel_signal(self, signum, frame) -> None:
        """SIGUSR1 from the node (or a thread of ours): cancel the running task if it is the
        target; the cancel frame may still be unread, so read what is there."""
        task_id = self.running_main
        if task_id is None:
            return
        if task_id not in self.cancelled and self.conn.read_lock.acquire(blocking=False):
            try:
                select.select([self.conn.sock], [], [], 0.2)
                for message in self.conn.read_available():
                    if message["op"] == "reply":
                        self.conn.deliver_reply(message)
                    elif message["op"] == "cancel":
                        self.cancelled.add(message["tid"])
                    else:
                        self.route(message)
            except (ChannelClosed, OSError):
                pass  # the main loop sees the closed channel next time it reads
            finally:
                self.conn.read_lock.release()
        if task_id in self.cancelled and self.running_main == task_id:
            raise KeyboardInterrupt

    def pump_main(self) -> None:
        with self.conn.read_lock:
            self.conn.pump()

    # ---- main thread
    def main_loop(self) -> None:
        conn = self.conn
        while True:
            with conn.read_lock:
                try:
                    while not conn.deferred:
                        conn.pump()
                except ChannelClosed:
                    return
                message = conn.deferred.popleft()
            op = message["op"]
            try:
                if op == "task":
                    self._run_task(message)
                elif op == "actor_create":
                    self._create_actor(message)
                elif op == "actor_call":
                    if self.actor_pool is not None or self.actor_loop is not None:
                        self._dispatch_concurrent(message)
                    else:
                        self._run_actor_call(message)
            except KeyboardInterrupt:
                # a cancel that arrived just after its task finished: nothing left to stop
                continue
            finally:
                message = None
                core = context.current_core()
                if core is not None and core.releases_pending:
                    core.flush_releases()  # refs the task held are let go of now, not later

    def _load(self, code_hash: bytes, blob: bytes | None):
        obj = self.code_cache.get(code_hash)
        if obj is None:
            if blob is None:
                raise RuntimeError("node sent a task without its code and the worker has none")
            obj = serialization.deserialize(blob)
            self.code_cache[code_hash] = obj
        return obj

    def _run_task(self, message: dict) -> None:
        task_id = message["tid"]
        name = message.get("name", "task")
        if task_id in self.cancelled:
            self.cancelled.discard(task_id)
            self._finish_cancelled(task_id, name)
            return
        token = context.current_task_id.set(task_id)
        pg_token = context.current_placement_group.set(message.get("pg"))
        if "gpus" in message:  # the node has GPUs: the task sees exactly its own
            gpus.apply_gpu_ids(message["gpus"])
        restore_env = runtime_env.apply_frame(message.get("renv"))
        self.running_main = self.last_main = task_id
        try:
            fn = self._load(message["fn"], message.get("blob"))
            args, kwargs = decode_args(message["args"])
            result = fn(*args, **kwargs)
            if message["nret"] == STREAMING:
                self._stream_sync(task_id, result, message)
                self.running_main = None
                return
            self.running_main = None
            self._reply_results(task_id, result, message["nret"], name)
        except KeyboardInterrupt:
            self.running_main = None
            self._finish_cancelled(task_id, name)
        except BaseException as exc:  # user code: report every failure to the owner
            self.running_main = None
            data, mro = encode_error(name, exc, self.node_id)
            self.conn.send({"op": "done", "tid": task_id, "err": data, "mro": mro})
        finally:
            self.running_main = None
            self.cancelled.discard(task_id)
            context.current_task_id.reset(token)
            context.current_placement_group.reset(pg_token)
            restore_env()

    def _finish_cancelled(self, task_id: bytes, name: str) -> None:
        err = serialization.dumps_code(TaskCancelledError(f"task {name} was cancelled"))
        self.conn.send(
            {"op": "done", "tid": task_id, "err": err, "mro": ["cancelled"], "cancelled": True}
        )

    def _reply_results(self, task_id: bytes, result, nret: int, name: str) -> None:
        items: tuple
        if nret == 1:
            items = (result,)
        elif nret == 0:
            items = ()
        else:
            items = tuple(result)
            if len(items) != nret:
                raise ValueError(
                    f"task {name} declared num_returns={nret} but returned {len(items)} values"
                )
        values = []
        inner = []
        for item in items:
            with collect_refs() as found:
                values.append(serialization.serialize(item))
            inner.append(found)
        message = {"op": "done", "tid": task_id, "vals": values}
        if any(inner):  # refs inside results: the node keeps them alive with each result
            message["inner"] = inner
        self.conn.send(message)

    def _stream_sync(self, task_id: bytes, generator, message: dict) -> None:
        window = message.get("window") or STREAM_WINDOW
        index = 0
        name = message.get("name", "task")
        on_main = threading.get_ident() == self.main_ident
        try:
            for item in generator:
                self.credit.wait_for_room(
                    task_id,
                    index,
                    window,
                    lambda: task_id in self.cancelled,
                    self.pump_main if on_main else None,
                )
                self.conn.send(yield_message(task_id, index, item))
                index += 1
        except KeyboardInterrupt:
            raise
        except BaseException as exc:
            data, mro = encode_error(name, exc, self.node_id)
            self.conn.send({"op": "done", "tid": task_id, "n": index, "err": data, "mro": mro})
            return
        finally:
            self.credit.forget(task_id)
        self.conn.send({"op": "done", "tid": task_id, "n": index})

    async def _stream_async(self, task_id: bytes, agen, message: dict) -> None:
        window = message.get("window") or STREAM_WINDOW
        index = 0
        name = message.get("name", "task")
        loop = asyncio.get_running_loop()
        try:
            async for item in agen:
                await loop.run_in_executor(
                    None,
                    self.credit.wait_for_room,
                    task_id,
                    index,
                    window,
                    lambda: task_id in self.cancelled,
                )
                self.conn.send(yield_message(task_id, index, item))
                index += 1
        except BaseException as exc:
            data, mro = encode_error(name, exc, self.node_id)
            self.conn.send({"op": "done", "tid": task_id, "n": index, "err": data, "mro": mro})
            return
        finally:
            self.credit.forget(task_id)
        self.conn.send({"op": "done", "tid": task_id, "n": index})

    # ---- actors
    def _create_actor(self, message: dict) -> None:
        self.actor_id = message["aid"]
        context.current_actor_id.set(self.actor_id)
        context.current_placement_group.set(message.get("pg"))
        if "gpus" in message:  # for the actor's lifetime
            gpus.apply_gpu_ids(message["gpus"])
        runtime_env.apply_frame(message.get("renv"))  # for the actor's lifetime
        name = message.get("name", "actor")
        try:
            cls = self._load(message["cls"], message.get("blob"))
            args, kwargs = decode_args(message["args"])
            self.actor = cls(*args, **kwargs)
        except BaseException as exc:
            data, _ = encode_error(f"{name}.__init__", exc, self.node_id)
            self.actor_error = data
            self.conn.send({"op": "actor_ready", "aid": self.actor_id, "err": data})
            return
        max_concurrency = message.get("mc") or 1
        if message.get("async"):
            self.actor_loop = asyncio.new_event_loop()
            ready = threading.Event()

            def run_loop():
                asyncio.set_event_loop(self.actor_loop)
                self.actor_semaphore = asyncio.Semaphore(max_concurrency)
                context.current_actor_id.set(self.actor_id)
                ready.set()
                self.actor_loop.run_forever()

            threading.Thread(target=run_loop, name="actor-loop", daemon=True).start()
            ready.wait()
        elif max_concurrency > 1:
            self.actor_pool = ThreadPoolExecutor(max_concurrency, thread_name_prefix="actor")
        self.conn.send({"op": "actor_ready", "aid": self.actor_id})

    def _dispatch_concurrent(self, message: dict) -> None:
        if self.actor_loop is not None:
            asyncio.run_coroutine_threadsafe(self._run_actor_call_async(message), self.actor_loop)
        elif self.actor_pool is not None:
            self.actor_pool.submit(self._run_actor_call, message)

    def _actor_method(self, message: dict):
        if self.actor_error is not None:
            raise ActorDiedError(
                "the actor's constructor raised, so it cannot run calls:\n"
                + str(serialization.deserialize(self.actor_error))
            )
        method_name = message["m"]
        if method_name == "__lattica_ready__":
            return lambda: True
        return getattr(self.actor, method_name)

    def _run_actor_call(self, message: dict) -> None:
        task_id = message["tid"]
        name = message.get("name", message["m"])
        if task_id in self.cancelled:
            self.cancelled.discard(task_id)
            self._finish_cancelled(task_id, name)
            return
        token = context.current_task_id.set(task_id)
        on_main = threading.current_thread() is threading.main_thread()
        if on_main:
            self.running_main = self.last_main = task_id
        try:
            method = self._actor_method(message)
            args, kwargs = decode_args(message["args"])
            result = method(*args, **kwargs)
            if message["nret"] == STREAMING:
                self._stream_sync(task_id, result, message)
                return
            if on_main:
                self.running_main = None
            self._reply_results(task_id, result, message["nret"], name)
        except KeyboardInterrupt:
            self._finish_cancelled(task_id, name)
        except BaseException as exc:
            data, mro = encode_error(name, exc, self.node_id)
            self.conn.send({"op": "done", "tid": task_id, "err": data, "mro": mro})
        finally:
            if on_main:
                self.running_main = None
            self.cancelled.discard(task_id)
            context.current_task_id.reset(token)

    async def _run_actor_call_async(self, message: dict) -> None:
        task_id = message["tid"]
        name = message.get("name", message["m"])
        assert self.actor_semaphore is not None  # made on the actor's loop before it runs calls
        async with self.actor_semaphore:
            if task_id in self.cancelled:
                self.cancelled.discard(task_id)
                self._finish_cancelled(task_id, name)
                return
            context.current_task_id.set(task_id)
            try:
                method = self._actor_method(message)
                args, kwargs = decode_args(message["args"])
                result = method(*args, **kwargs)
                if message["nret"] == STREAMING:
                    if inspect.isasyncgen(result):
                        await self._stream_async(task_id, result, message)
                    else:
                        await asyncio.get_running_loop().run_in_executor(
                            None, self._stream_sync, task_id, result, message
                        )
                    return
                if inspect.isawaitable(result):
                    result = await result
                self._reply_results(task_id, result, message["nret"], name)
            except asyncio.CancelledError:
                self._finish_cancelled(task_id, name)
            except BaseException as exc:
                data, mro = encode_error(name, exc, self.node_id)
                self.conn.send({"op": "done", "tid": task_id, "err": data, "mro": mro})


def _capture_output(conn: WorkerConnection, node_id: str, workers: list):
    """Send this worker's stdout/stderr lines to its node, tagged with the running task (they
    reach the task's driver; LATTICARAY_LOG_TO_DRIVER=0 leaves them on the node's output).
    Every `done` waits for the task's lines to leave first."""
    if os.environ.get("LATTICARAY_LOG_TO_DRIVER", "1") == "0":
        return None
    from latticaray.observe.capture import OutputCapture
    from latticaray.observe.logs import LogContext

    contexts: dict[bytes, LogContext] = {}

    def current() -> LogContext | None:
        return context_of(context.current_task_id.get())

    def on_main_thread() -> LogContext | None:  # output below Python: the main thread's task
        worker = workers[0] if workers else None
        if worker is None:
            return None
        return context_of(worker.running_main or worker.last_main)

    def context_of(tid: bytes | None) -> LogContext | None:
        if tid is None:
            return None
        found = contexts.get(tid)
        if found is None:
            if len(contexts) > 256:
                contexts.clear()
            found = contexts[tid] = LogContext("", tid.hex())
        return found

    send = conn.send
    node_name = socket.gethostname()
    capture = OutputCapture(
        node_name,
        lambda batch: send({"op": "log", "b": batch.encode()}),
        context=current,
        pipe_context=on_main_thread,
    ).start()

    def send_after_output(message: dict) -> None:
        if message.get("op") in ("done", "actor_ready"):
            capture.flush()
        send(message)

    conn.send = send_after_output  # type: ignore[method-assign]
    return capture


def main(argv: list[str]) -> None:
    fd, node_id, worker_id = int(argv[0]), argv[1], argv[2]
    sock = socket.socket(fileno=fd)
    sock.setblocking(True)
    conn = WorkerConnection(sock)
    workers: list[Worker] = []
    capture = _capture_output(conn, node_id, workers)
    worker = Worker(conn, node_id, worker_id)
    workers.append(worker)
    context.set_core(WorkerCore(conn, node_id, worker_id))
    signal.signal(signal.SIGUSR1, worker.on_cancel_signal)
    try:
        conn.send({"op": "hello", "pid": os.getpid(), "wid": worker_id})
    except OSError:
        os._exit(0)  # the node went away before this worker came up
    try:
        worker.main_loop()
    finally:
        if capture is not None:
            capture.flush()
        try:
            sock.close()
        except OSError:
            pass
        serialization.close_store()
        os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1:])
