"""Running the handlers of the calls an RPC session serves (asyncio).

:class:`HandlerRunner` starts the handler of each call the session's core accepted (a
``CALL_OPENED`` event), as a task or, for unary handlers registered ``eager``, stepped inline up
to their first real suspension; it queues the reply or error each handler ends with into the
core and tells the core when a handler has finished. Stopping a handler (remote cancel, deadline,
session close) is ``handle.stop(reason)`` on what the runner registered in the core's table.
"""

from __future__ import annotations

import asyncio
import collections.abc
from collections.abc import AsyncIterator, Callable, Generator
from typing import Any

from .errors import RpcError, Status
from .framing import CLIENT_STREAM, FLAG_END, FLAG_MSG, FLAG_RESPONSE, MESSAGE, SERVER_STREAM
from .rpccall import CallContext, CallSession, StreamCall
from .rpccore import Event, SessionState
from .rpcflow import INITIAL_WINDOW

__all__ = ["HandlerRunner"]

_CLOSED = SessionState.CLOSED

# The running task of each loop, as asyncio keeps it (asyncio.current_task without its Python
# wrapper).
_current_tasks = asyncio.tasks._current_tasks  # type: ignore[attr-defined]
# asyncio's own bookkeeping of the running task (C-accelerated; used by every Task step). The
# eager path steps a handler outside any task, so it takes the current task out for that step.
_enter_task = asyncio.tasks._enter_task
_leave_task = asyncio.tasks._leave_task


class _Resume(collections.abc.Coroutine[Any, Any, Any]):
    """Hands a coroutine that was already stepped once (eagerly) to an asyncio Task."""

    __slots__ = ("_coro", "_first", "_started")

    def __init__(self, coro: collections.abc.Coroutine[Any, Any, Any], first_yield: Any) -> None:
        self._coro = coro
        self._first = first_yield
        self._started = False

    def send(self, value: Any) -> Any:
        if not self._started:
            self._started = True
            return self._first
        return self._coro.send(value)

    def throw(self, typ: Any, val: Any = None, tb: Any = None) -> Any:
        self._started = True
        if val is None:
            return self._coro.throw(typ)
        return self._coro.throw(val)

    def close(self) -> None:
        self._coro.close()

    def __await__(self) -> Generator[Any, None, Any]:
        return self  # type: ignore[return-value]


class _InUnary:
    """A unary handler that awaited, so runs as a task (kept for cancel and deadline)."""

    __slots__ = ("ctx", "reason", "runner", "task")

    def __init__(self, runner: HandlerRunner, ctx: CallContext) -> None:
        self.runner = runner
        self.ctx = ctx
        self.task: asyncio.Task[Any] | None = None
        self.reason: str | None = None

    def on_done(self, task: asyncio.Task[Any]) -> None:
        self.runner.unary_done(self, task)

    def stop(self, reason: str) -> None:
        self.ctx.mark_cancelled()
        if self.reason is None:
            self.reason = reason
        if self.task is not None:
            self.task.cancel()


class HandlerRunner:
    """Starts and finishes the handlers of one session's served calls (see the module docstring).

    ``watch_deadline(deadline)`` makes sure the session's timer fires by ``deadline``.
    """

    def __init__(self, session: CallSession, watch_deadline: Callable[[float], None]) -> None:
        self._session = session
        self._core = session.core
        self._loop = session.loop
        self._watch_deadline = watch_deadline
        self._max_frame = session.core.limits.max_frame_size

    def start_stream(self, event: Event) -> None:
        """Start the handler of an accepted streaming call (a CALL_OPENED event)."""
        _, call_id, service, call_type, handler, _, deadline, flags, payload = event
        ctx = CallContext(self._session, call_id, service, deadline)
        call = StreamCall(self._session, call_id, service, False, deadline)
        call.ctx = ctx
        runner: collections.abc.Coroutine[Any, Any, None]
        if call_type == SERVER_STREAM:
            self._core.track_incoming_stream(call_id, call, deadline, INITIAL_WINDOW)
            call.recv_done = True
            runner = self._run_server_stream(call, handler(ctx, payload))
        else:
            self._core.track_incoming_stream(
                call_id, call, deadline, self._core.limits.stream_window
            )
            if flags & (FLAG_MSG | FLAG_END):
                call.deliver(flags, payload)
            if call_type == CLIENT_STREAM:
                runner = self._run_client_stream(call, handler)
            else:
                runner = self._run_server_stream(call, handler(ctx, call))
        self._watch_deadline(deadline)
        call.task = self._loop.create_task(runner)

    def start_unary(self, event: Event) -> None:
        """Start the handler of an accepted unary call (a CALL_OPENED event): eagerly (inline
        until it first waits) if it was registered so, else as a task."""
        _, call_id, service, _, handler, eager, deadline, _, payload = event
        ctx = CallContext(self._session, call_id, service, deadline)
        core = self._core
        if not eager:
            try:
                coro = handler(ctx, payload)
            except Exception as exc:
                core.send_exception(call_id, exc)
                return
            call = _InUnary(self, ctx)
            core.track_incoming(call_id, call, ctx.deadline)
            self._watch_deadline(ctx.deadline)
            task = call.task = self._loop.create_task(coro)
            task.add_done_callback(call.on_done)
            return
        # While the handler runs inline no task is current, so asyncio.timeout() or
        # current_task() in it fail loudly instead of capturing (and later cancelling) our reader.
        loop = self._loop
        current = _current_tasks.get(loop)
        if current is not None:
            _leave_task(loop, current)
        try:
            coro = handler(ctx, payload)
            first = coro.send(None)
        except StopIteration as stop:
            reply = stop.value
            if type(reply) is bytes and len(reply) <= self._max_frame:
                core.send([MESSAGE, call_id, FLAG_MSG | FLAG_END | FLAG_RESPONSE], reply)
            else:
                core.send_reply(call_id, reply)
            return
        except Exception as exc:  # the handler failed before its first await
            core.send_exception(call_id, exc)
            return
        except asyncio.CancelledError:
            core.send_error(call_id, Status.CANCELLED, "handler cancelled itself")
            return
        finally:
            if current is not None:
                _enter_task(loop, current)
        call = _InUnary(self, ctx)
        core.track_incoming(call_id, call, ctx.deadline)
        self._watch_deadline(ctx.deadline)
        task = call.task = loop.create_task(_Resume(coro, first))
        task.add_done_callback(call.on_done)

    def unary_done(self, call: _InUnary, task: asyncio.Task[Any]) -> None:
        call_id = call.ctx.call_id
        core = self._core
        core.finish_incoming(call_id)
        if core.state is _CLOSED:
            return
        if task.cancelled():
            if call.reason == Status.DEADLINE_EXCEEDED:
                core.send_error(call_id, Status.DEADLINE_EXCEEDED, "handler exceeded the deadline")
            elif call.reason is None:
                core.send_error(call_id, Status.CANCELLED, "handler was cancelled")
            return
        exc = task.exception()
        if exc is not None:
            core.send_exception(call_id, exc)
        else:
            core.send_reply(call_id, task.result())

    async def _run_server_stream(self, call: StreamCall, replies: AsyncIterator[bytes]) -> None:
        call_id = call.call_id
        core = self._core
        try:
            async for reply in replies:
                if not isinstance(reply, (bytes, bytearray, memoryview)):
                    raise TypeError(
                        f"stream handler yielded {type(reply).__name__}, expected bytes"
                    )
                await call.send(reply)
            if not call.finished:
                call.end()
        except asyncio.CancelledError:
            if call.reason == Status.DEADLINE_EXCEEDED and core.state is not _CLOSED:
                core.send_error(call_id, Status.DEADLINE_EXCEEDED, "handler exceeded the deadline")
        except RpcError as exc:
            if call.reason is None and core.state is not _CLOSED:
                core.send_exception(call_id, exc)
        except Exception as exc:
            if core.state is not _CLOSED:
                core.send_exception(call_id, exc)
        finally:
            core.finish_incoming(call_id)
            call.finished = True
            aclose = getattr(replies, "aclose", None)
            if aclose is not None:
                try:
                    await aclose()
                except Exception:
                    pass

    async def _run_client_stream(self, call: StreamCall, handler: Callable[..., Any]) -> None:
        call_id = call.call_id
        core = self._core
        try:
            reply = await handler(call.ctx, call)
            if core.state is not _CLOSED and call.reason is None:
                core.send_reply(call_id, reply)
        except asyncio.CancelledError:
            if call.reason == Status.DEADLINE_EXCEEDED and core.state is not _CLOSED:
                core.send_error(call_id, Status.DEADLINE_EXCEEDED, "handler exceeded the deadline")
        except Exception as exc:
            if core.state is not _CLOSED and call.reason is None:
                core.send_exception(call_id, exc)
        finally:
            core.finish_incoming(call_id)
            call.finished = True
