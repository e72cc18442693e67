"""This process's spare: a pre-faulted temp file for the next large put, made fresh or recycled.

Why (figures in docs/perf-notes.md, "Object store"): a put's cost is dominated not by copying
but by the kernel allocating, zeroing and mapping fresh tmpfs pages. After a large put
(>= ``WARM_MIN_BYTES``) a background thread prepares one spare temp file of that size:
``posix_fallocate``d, mapped writable and every page touched (:class:`Spare`). The next put that
fits copies its payload straight into that mapping, then trims the file to its sealed size and
renames it into ``objects/`` as usual.

Rules kept here (the ledger is in ledger.py, the put paths in store.py):

- A spare is a reservation in the ledger (so the budget holds), made only from free room (never
  evicts; needs twice its size free); the spares of all processes stay within ``capacity // 8``.
  Its token ends in ``-warm``. Making one costs more CPU than the write it saves, so it is made
  by a niced thread, and only while large puts leave it the idle time (``refill_seconds``, the
  time the last one took, since ``last_large_put_end``).
- Recycling: a large sealed object being deleted, or the temp file of a duplicate put, may become
  the spare instead of being unlinked (:meth:`SpareKeeper.recycle`): renamed to
  ``tmp/<pid>-<id>-warm`` under the ledger lock (no CID names it any more), its bytes a spare
  reservation. It is written only after the kernel proves nobody else has it open or mapped
  (:func:`prove_unshared`: a write lease, granted only to the sole opener; a mapping keeps its
  file open). If refused, it is unlinked as a plain delete would, and readers keep their bytes.
  A recycled file's pages exist: it is mapped with ``MADV_POPULATE_WRITE`` by a thread that is
  not niced; a put that comes while a fitting file is being recycled waits for it (bounded). A
  fresh spare being made gives way to a recycled file (its maker stops within one granule).
- Kept mappings: a spare written by a local put stays mapped (``RETAINED_MAX`` of them, with
  their fds), so that if its file comes back (gifts.py) the put is a plain memcpy.
- ``close()`` (or process exit) gives the spare back; spares of processes that died without
  closing are reclaimed when room is needed or the next spare is made. After a fork, the child
  never touches its parent's spare.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import mmap
import multiprocessing.util
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol

import numpy as np

from .layout import WARM_SUFFIX, StorePaths, new_token
from .ledger import Ledger, LedgerFile

__all__ = ["RETAINED_MAX", "WARM_MIN_BYTES", "Spare", "SpareKeeper", "prove_unshared"]

WARM_MIN_BYTES = 16 << 20  # smaller puts neither use nor make spares
WARM_GRANULE = 16 << 20  # spares are sized (and made, abandoned) in steps of this size
RETAINED_MAX = 2  # spent spares whose mappings a process keeps for when their files come back
_MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)  # Linux >= 5.14


def round_to_granule(nbytes: int) -> int:
    return -(-nbytes // WARM_GRANULE) * WARM_GRANULE


def prove_unshared(fd: int) -> None:
    """Raise OSError unless ``fd`` is the only open file (or mapping) of its inode: Linux grants
    a write lease only then. The lease is dropped at once; it is only a probe."""
    fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_WRLCK)
    fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)


class Spare:
    """A pre-allocated, pre-faulted temp file mapped writable, waiting for the next large put.

    ``recycled``: an existing file (a deleted object's), proven unshared before any byte of it
    is written, its existing pages mapped in one call per granule. ``abandon``: set, a fresh
    spare being made gives up within one granule (InterruptedError)."""

    def __init__(
        self,
        path: str,
        token: str,
        size: int,
        recycled: bool = False,
        abandon: threading.Event | None = None,
    ) -> None:
        self.path = path
        self.token = token
        self.size = size
        self.recycled = recycled
        self.fd = os.open(
            path, os.O_RDWR if recycled else os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600
        )
        try:
            if recycled:
                prove_unshared(self.fd)  # before any byte of it is written
            for start in range(0, size, WARM_GRANULE):
                if abandon is not None and abandon.is_set():
                    raise InterruptedError("spare abandoned for a recycled file")
                os.posix_fallocate(self.fd, start, min(WARM_GRANULE, size - start))
            self.map = mmap.mmap(self.fd, size)
            populated = False
            if recycled:
                # kernels without MADV_POPULATE_WRITE fall back to touching every page below
                try:
                    for start in range(0, size, WARM_GRANULE):
                        self.map.madvise(
                            _MADV_POPULATE_WRITE, start, min(WARM_GRANULE, size - start)
                        )
                    populated = True
                except OSError:
                    populated = False
            # map every page now, with one store per page (numpy lets the GIL go): unlike
            # MAP_POPULATE this never holds the address-space lock for long, which would stall
            # the mmap/munmap of puts running beside it
            pages = np.frombuffer(self.map, dtype=np.uint8)
            for start in range(0, 0 if populated else size, WARM_GRANULE):
                if abandon is not None and abandon.is_set():
                    del pages
                    self.map.close()
                    raise InterruptedError("spare abandoned for a recycled file")
                pages[start : start + WARM_GRANULE : mmap.PAGESIZE] = 0
            del pages
        except BaseException:
            os.close(self.fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            raise

    def close(self) -> None:
        """Unmap and close (the file itself stays)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        try:
            self.map.close()
        except BufferError:  # a view of the mapping is still alive; the GC unmaps it later
            pass


class Closeable(Protocol):
    def close(self) -> None: ...


_to_close_at_exit: dict[int, Closeable] = {}
_exit_hooks_installed = False


def _close_all_at_exit() -> None:
    for owner in list(_to_close_at_exit.values()):
        with contextlib.suppress(Exception):
            owner.close()


def close_at_exit(owner: Closeable) -> None:
    """Keep ``owner`` until it is closed or the process exits, then close it (its spare goes)."""
    global _exit_hooks_installed
    _to_close_at_exit[id(owner)] = owner
    if not _exit_hooks_installed:
        _exit_hooks_installed = True
        atexit.register(_close_all_at_exit)
        # multiprocessing children skip atexit; they run these finalizers instead
        multiprocessing.util.Finalize(None, _close_all_at_exit, exitpriority=10)


def forget_at_exit(owner: Closeable) -> None:
    _to_close_at_exit.pop(id(owner), None)


class SpareKeeper:
    """The spare of one process in one store, the threads that make it, and kept mappings."""

    def __init__(
        self,
        paths: StorePaths,
        ledger_file: LedgerFile,
        capacity: int,
        enabled: bool,
        recycle: bool,
        owner: Closeable,
    ) -> None:
        self.paths = paths
        self.ledger_file = ledger_file
        self.capacity = capacity
        self.enabled = enabled
        self.recycle_enabled = enabled and recycle
        self.owner = owner  # closed at exit once this process holds a spare
        self.spares_made = 0  # fresh spares made by this process (observability; tests)
        self.spares_recycled = 0  # deleted objects' files made into spares (observability)
        #: a fresh spare is made only if large puts leave this much idle time between them
        self.refill_seconds = 0.0  # (how long the last one took to make)
        self.last_large_put_end = float("-inf")
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)  # notified when a refill/recycle ends
        self._spare: Spare | None = None
        self._refilling = False
        self._abandon_refill = threading.Event()  # tells a fresh spare's maker to give up
        self._fresh_token: str | None = None  # reservation of the fresh spare being made
        self._recycling = False  # a file is on its way to become the spare (one at a time)
        self._recycling_size = 0
        self._pid = os.getpid()
        self._to_unmap: list[Spare] = []  # spent spares whose mappings are yet to be closed
        # spares written by local puts, still mapped (and open) for when their files come back
        self._retained: OrderedDict[tuple[int, int], Spare] = OrderedDict()

    def _forget_parents(self) -> None:
        """After a fork the spare (and its refill thread) belong to the parent: never touch
        them (the caller holds ``_lock``)."""
        if self._pid != os.getpid():
            self._pid = os.getpid()
            self._spare, self._to_unmap, self._refilling = None, [], False
            self._retained = OrderedDict()
            self._recycling, self._fresh_token = False, None

    @property
    def has_spare(self) -> bool:
        return self._spare is not None

    def take(self, estimate: int) -> Spare | None:
        """The idle spare if it fits ``estimate`` bytes (waiting, bounded, for a fitting file
        being recycled: ready in a few ms, far sooner than fresh pages)."""
        with self._lock:
            self._forget_parents()
            if self._spare is None and self._recycling and self._recycling_size >= estimate:
                self._ready.wait_for(lambda: not self._recycling, timeout=2.0)
            spare = self._spare
            if spare is not None and spare.size >= estimate:
                self._spare = None
                return spare
        return None

    def give_room(self, ledger: Ledger, nbytes: int) -> None:
        """Before a put without a spare reserves ``nbytes``: the idle spare gives its room back
        if the put would not fit beside it (the caller holds the ledger lock)."""
        if self._spare is not None and ledger.committed() + nbytes > self.capacity:
            with self._lock:
                spare, self._spare = self._spare, None
            if spare is not None:
                spare.close()
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(spare.path)
                ledger.release(spare.token)

    def install(self, spare: Spare) -> None:
        with self._lock:
            previous, self._spare = self._spare, spare
        if previous is not None:
            self.discard(previous)

    def discard(self, spare: Spare) -> None:
        """A spare not used (replaced, or its put failed): closed, its file removed, its
        reservation given back."""
        spare.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(spare.path)
        self.ledger_file.release(spare.token)

    def spent(self, spare: Spare) -> None:
        """A spare now sealed as an object: its mapping is closed later, off the put's path
        (unmapping 100 MB takes milliseconds)."""
        if spare.fd >= 0:
            os.close(spare.fd)
            spare.fd = -1
        with self._lock:
            self._to_unmap.append(spare)

    def unmap_later(self, spare: Spare) -> None:
        """Close a spare's fd now and its mapping on a background thread."""
        self.spent(spare)
        self._start(self._unmap_spent, "latticaray-store-unmap")

    def _unmap_spent(self) -> None:
        with self._lock:
            spent, self._to_unmap = self._to_unmap, []
        for spare in spent:
            spare.close()

    @staticmethod
    def _start(target: Callable[..., None], name: str, *args: object) -> None:
        threading.Thread(target=target, args=args, name=name, daemon=True).start()

    # --- kept mappings -------------------------------------------------------------------------
    def retain(self, spare: Spare) -> None:
        """Keep a spent spare's fd and mapping (bounded): if its file comes back, it is reused."""
        stat = os.fstat(spare.fd)
        with self._lock:
            self._retained[(stat.st_dev, stat.st_ino)] = spare
            stale = self._stale_retained()
            while len(self._retained) - len(stale) > RETAINED_MAX:
                stale.append(next(k for k in self._retained if k not in stale))
            dropped = [self._retained.pop(key) for key in stale]
        for kept in dropped:
            self.unmap_later(kept)

    def _stale_retained(self) -> list[tuple[int, int]]:
        """Kept mappings of files deleted elsewhere and not given back (they hold pages)."""
        return [key for key, kept in self._retained.items() if os.fstat(kept.fd).st_nlink == 0]

    def drop_stale_retained(self) -> None:
        with self._lock:
            dropped = [self._retained.pop(key) for key in self._stale_retained()]
        for kept in dropped:
            self.unmap_later(kept)

    def take_retained(self, dev: int, ino: int) -> Spare | None:
        """This process's kept mapping of the file (``dev``, ``ino``), if any."""
        with self._lock:
            return self._retained.pop((dev, ino), None)

    def _release_retained(self, path: str) -> None:
        """Close this process's kept mapping of ``path``'s file (it would refuse the lease)."""
        with contextlib.suppress(OSError):
            stat = os.stat(path)
            kept = self.take_retained(stat.st_dev, stat.st_ino)
            if kept is not None:
                kept.close()

    # --- fresh spares --------------------------------------------------------------------------
    def schedule(self, estimate: int, put_started: float, fresh: bool = True) -> None:
        """After a large put: prepare a spare of about ``estimate`` bytes in the background, if
        there is free room and large puts leave enough idle time between them to make one (a
        spare costs more CPU than it saves: it only helps when made in otherwise idle time).
        ``fresh=False``: the put went into a recycled file; deletes (or duplicates) are feeding
        spares, and a fresh one would only be abandoned for the next recycled file."""
        size = round_to_granule(estimate)
        with self._lock:
            self._forget_parents()
            idle = put_started - self.last_large_put_end
            self.last_large_put_end = time.monotonic()
            if (
                not self.enabled
                or not fresh
                or size > self.capacity // 8
                or self._refilling
                or self._recycling
                or idle < self.refill_seconds
                or (self._spare is not None and self._spare.size >= size)
            ):
                unmap_now = not self._refilling
                size = 0
            else:
                self._refilling = True
                self._abandon_refill.clear()
        if size == 0:
            if unmap_now and self._to_unmap:  # off the put's path
                self._start(self._unmap_spent, "latticaray-store-unmap")
            return
        close_at_exit(self.owner)
        self._start(self._refill, "latticaray-store-warm", size)

    def _refill(self, size: int) -> None:
        token = None
        with contextlib.suppress(OSError, AttributeError):
            # making a spare costs more CPU than the write it saves (pages are allocated, zeroed
            # and mapped either way): it must only use idle time, never slow the puts beside it
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        try:
            self._unmap_spent()
            with self.ledger_file.locked() as ledger:
                ledger.reclaim_dead(self.paths.tmp)
                if (
                    ledger.committed() + 2 * size > self.capacity
                    or ledger.reserved_as(WARM_SUFFIX) + size > self.capacity // 8
                    or self._abandon_refill.is_set()
                ):
                    return  # only from free room (never evicts), all processes' spares <= 1/8
                token = ledger.reserve(size, new_token(suffix=WARM_SUFFIX))
                self._fresh_token = token
            started = time.monotonic()
            spare = Spare(self.paths.temp(token), token, size, abandon=self._abandon_refill)
            self.refill_seconds = time.monotonic() - started
            self.spares_made += 1
            token = None
            self.install(spare)
        except OSError:
            pass  # no spare this time (e.g. shm full): puts take the plain path
        finally:
            if token is not None:
                self.ledger_file.release(token)
            with self._lock:
                self._fresh_token = None
                self._refilling = False
                self._ready.notify_all()

    def abandon_fresh(self) -> None:
        """Files come back (gifts): a fresh spare being made would cost for nothing."""
        with self._lock:
            if self._refilling:
                self._abandon_refill.set()

    # --- recycling -----------------------------------------------------------------------------
    def recycle(self, ledger: Ledger, path: str, sealed: bool) -> tuple[str, int] | None:
        """Move ``path`` (a sealed object's file if ``sealed``, else a temp file a duplicate put
        wrote) to become this process's next spare (the caller holds the ledger lock); None
        when it is not to be recycled. Pass the result to :meth:`start_recycle`."""
        if not self.recycle_enabled:
            return None
        try:
            info = os.stat(path)
        except FileNotFoundError:
            return None
        size = info.st_size
        if size < WARM_MIN_BYTES or info.st_nlink > 1:  # linked into another store: shared
            return None
        rounded = round_to_granule(size)
        with self._lock:
            self._forget_parents()
            if self._recycling or (self._spare is not None and self._spare.size >= rounded):
                return None
            self._recycling, self._recycling_size = True, rounded
            fresh = self._refilling  # a fresh spare is being made: it will give way
        # a fresh spare (pages yet to be allocated and zeroed) is worth less than this file: its
        # maker gives up within one granule, so its reservation is not counted against the cap
        spares = ledger.reserved_as(WARM_SUFFIX, excluding=self._fresh_token if fresh else None)
        token = new_token(suffix=WARM_SUFFIX)
        moved = False
        if (
            spares + rounded <= self.capacity // 8
            and ledger.committed() - size + rounded <= self.capacity
        ):
            with contextlib.suppress(OSError):
                os.rename(path, self.paths.temp(token))
                moved = True
        if not moved:
            with self._lock:
                self._recycling = False
                self._ready.notify_all()
            return None
        if fresh:
            self._abandon_refill.set()
        if sealed:
            ledger.used -= size
        ledger.reserve(rounded, token)
        return token, rounded

    def start_recycle(self, recycled: tuple[str, int] | None) -> None:
        if recycled is not None:
            close_at_exit(self.owner)
            self._start(self._finish_recycle, "latticaray-store-recycle", *recycled)

    def _finish_recycle(self, token: str, size: int) -> None:
        """Background: prove the file unshared, extend it to ``size``, map and fault it in. Not
        niced (unlike making a fresh spare): it only maps pages that exist, a cost the next put
        would pay anyway, and a starved recycle would leave back-to-back puts without a spare."""
        path = self.paths.temp(token)
        try:
            with self._lock:  # a fresh spare's maker gives up within one granule
                self._ready.wait_for(lambda: not self._refilling, timeout=60)
                if self._refilling:
                    raise TimeoutError("a fresh spare is still being made")
            self._unmap_spent()  # our own leftover mapping of it would (rightly) refuse the lease
            self._release_retained(path)
            spare = Spare(path, token, size, recycled=True)
            self.spares_recycled += 1
            self.install(spare)
        except OSError:  # still open or mapped somewhere (or no leases here): delete it plainly
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            self.ledger_file.release(token)
        finally:
            with self._lock:
                self._recycling = False
                self._ready.notify_all()

    # --- waiting, closing ----------------------------------------------------------------------
    def wait(self, timeout: float) -> bool:
        """Wait (bounded) until no spare is being prepared; True if a spare is ready."""
        with self._lock:
            self._forget_parents()
            self._ready.wait_for(
                lambda: not self._refilling and not self._recycling, timeout=timeout
            )
            return not self._refilling and not self._recycling and self._spare is not None

    def close(self, give_back: bool = True) -> None:
        """Drop the spare and kept mappings (``give_back``: remove the spare's file and
        reservation too; not needed when the whole store goes)."""
        self.wait(30.0)
        self._unmap_spent()
        with self._lock:
            self._forget_parents()
            spare, self._spare = self._spare, None
            retained, self._retained = list(self._retained.values()), OrderedDict()
        for kept in retained:
            kept.close()
        if spare is not None:
            if give_back:
                self.discard(spare)
            else:
                spare.close()
