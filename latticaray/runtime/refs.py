"""ObjectRef (a future value named by CID once sealed) and ObjectRefGenerator (streamed refs)."""

from __future__ import annotations

import asyncio
import threading

from latticaray.runtime import context

_collecting = threading.local()


class collect_refs:
    """Within this block, refs pickled on this thread are listed (as [id, owner]) instead of
    escaping: the caller hands the list to the node, which counts them as contained in the value
    (or as pinned by a task's arguments) and keeps them alive exactly that long."""

    def __enter__(self) -> list:
        self._outer = getattr(_collecting, "refs", None)
        found: list[list] = []
        _collecting.refs = found
        return found

    def __exit__(self, *exc) -> None:
        _collecting.refs = self._outer


def collecting_refs() -> list | None:
    """The list refs pickled on this thread go to (inside `collect_refs`), else None."""
    return getattr(_collecting, "refs", None)


class ObjectRef:
    """A reference to a task's result or a put object.

    Until the object exists it is bound to the producing task (its id is the task id plus the
    return index); once sealed, `ref.cid` / `str(ref)` give the object's CID, by which any peer
    of the mesh can fetch it. Refs are serializable and can be passed to other tasks.
    """

    __slots__ = ("__weakref__", "_cid", "_counted", "id", "owner")

    def __init__(
        self, object_id: bytes, owner: str = "", cid: str | None = None, _count: bool = True
    ):
        self.id = object_id
        self.owner = owner
        self._cid = cid
        self._counted = False
        if _count:
            core = context.current_core()
            if core is not None:
                core.add_ref(object_id)
                self._counted = True

    def __del__(self):
        if self._counted:
            core = context.current_core()
            if core is not None:
                try:
                    core.remove_ref(self.id)
                except Exception:
                    pass

    @property
    def cid(self) -> str:
        """The object's CID, waiting for the producing task to finish if needed."""
        if self._cid is None:
            self._cid = context.require_core().object_cid(self)
        return self._cid

    def cid_if_known(self) -> str | None:
        return self._cid

    def hex(self) -> str:
        return self.id.hex()

    def task_id(self) -> bytes:
        return self.id[:16]

    def __str__(self) -> str:
        try:
            return self.cid
        except Exception:
            return f"ObjectRef({self.id.hex()})"

    def __repr__(self) -> str:
        return f"ObjectRef({self.id.hex()}{', ' + self._cid if self._cid else ''})"

    def __eq__(self, other) -> bool:
        return isinstance(other, ObjectRef) and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)

    def __reduce__(self):
        found = getattr(_collecting, "refs", None)
        if found is not None:
            found.append([self.id, self.owner])
        else:  # pickled outside the runtime's serialization: nothing can track it, pin it
            core = context.current_core()
            if core is not None:
                core.escape_ref(self)
        return (_rebuild_ref, (self.id, self.owner, self._cid))

    def future(self):
        """A concurrent.futures.Future resolving to the value."""
        return context.require_core().value_future(self)

    def __await__(self):
        return asyncio.wrap_future(self.future()).__await__()


def borrowed_ref(object_id: bytes, owner: str, cid: str | None = None, core=None) -> ObjectRef:
    """A ref this process got a copy of (deserialized, or an item taken again from a stream):
    counted as a borrow, which the node learns of (``core``: the current one by default)."""
    ref = ObjectRef(object_id, owner, cid, _count=False)
    core = core or context.current_core()
    if core is not None:
        core.add_borrowed_ref(object_id, owner)
        ref._counted = True
    return ref


def _rebuild_ref(object_id: bytes, owner: str, cid: str | None) -> ObjectRef:
    return borrowed_ref(object_id, owner, cid)


class ObjectRefGenerator:
    """Refs of a streaming task's items, in order, as the task yields them.

    Iterating waits for the next item; the producer is held back (backpressure) when the
    consumer falls behind by more than the stream window. Each item taken is an ObjectRef
    counted like any other; when the generator the submitter got is dropped, the items nobody
    took are released (copies of it, pickled elsewhere, do not keep them).
    """

    def __init__(self, task_id: bytes, owner: str, _owned: bool = False):
        self._task_id = task_id
        self._owner = owner
        self._next_index = 0
        self._done = False
        self._owned = _owned

    @property
    def owner(self) -> str:
        """The node that owns the stream (where its task was submitted)."""
        return self._owner

    def __del__(self):
        if self._owned:
            core = context.current_core()
            if core is not None:
                try:
                    core.drop_stream(self._task_id)
                except Exception:
                    pass

    def __iter__(self):
        return self

    def __next__(self) -> ObjectRef:
        return self._next_sync(None)

    def _next_sync(self, timeout: float | None) -> ObjectRef:
        if self._done:
            raise StopIteration
        ref = context.require_core().stream_next(
            self._task_id, self._next_index, timeout, self._owner
        )
        if ref is None:
            self._done = True
            raise StopIteration
        self._next_index += 1
        return ref

    def __aiter__(self):
        return self

    async def __anext__(self) -> ObjectRef:
        if self._done:
            raise StopAsyncIteration
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(None, self._next_sync, None)
        except StopIteration:
            raise StopAsyncIteration from None

    def task_id(self) -> bytes:
        return self._task_id

    def __reduce__(self):
        return (ObjectRefGenerator, (self._task_id, self._owner))

    def __repr__(self) -> str:
        return f"ObjectRefGenerator({self._task_id.hex()})"
