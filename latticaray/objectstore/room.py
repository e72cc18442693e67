"""Keeping the budget: reservations, and the room made for them by evicting and spilling.

:meth:`Room.reserve` records a reservation in the ledger once there is room for it: when the
store is full, it gathers what is in memory and in the spill directory, asks the pure planner
(eviction.py) what to evict, and applies its steps: copy to the spill directory (written,
fsynced, renamed) or delete; a local object is first linked under its CID (spills are named by
CID). :meth:`Room.restore` brings a spilled object back. Every method runs under the ledger
lock (the caller's ``ledger``), except ``restore``, which takes it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Callable

from latticaray.observe import metrics

from .errors import StoreFull
from .eviction import Budget, Entry, Evict, plan_eviction
from .layout import StorePaths, is_local_name, new_token
from .ledger import Ledger, LedgerFile

__all__ = ["Room", "drop_spilled_copy"]

# evictions counted in the process that made them (the node, a worker or a driver putting)
_SPILLED = metrics.OBJECT_STORE_EVICTIONS.labels("spilled")
_DELETED = metrics.OBJECT_STORE_EVICTIONS.labels("deleted")
_SPILL_DROPPED = metrics.OBJECT_STORE_EVICTIONS.labels("spill_dropped")

#: links the local object ``name`` under its CID (the caller holds the lock): its CID string,
#: or None if the object is gone
LinkLocal = Callable[[Ledger, str], "str | None"]


class Room:
    """The budget of one store: ``capacity`` bytes in memory, ``spill_capacity`` on disk."""

    def __init__(
        self,
        paths: StorePaths,
        ledger_file: LedgerFile,
        capacity: int,
        spill_capacity: int,
        link_local: LinkLocal,
    ) -> None:
        self.paths = paths
        self.ledger_file = ledger_file
        self.capacity = capacity
        self.spill_capacity = spill_capacity
        self._link_local = link_local

    def reserve(self, ledger: Ledger, nbytes: int, keep: str | None = None) -> str:
        """Reserve ``nbytes`` (evicting if needed; ``keep`` is never dropped from the spill
        directory); StoreFull if pinned objects and reservations leave no room."""
        if nbytes > self.capacity:
            raise StoreFull(
                f"object of {nbytes} bytes exceeds the store capacity of {self.capacity}"
            )
        self.make_room(ledger, nbytes, keep)
        return ledger.reserve(nbytes)

    def fits(self, ledger: Ledger, nbytes: int) -> bool:
        return ledger.committed() + nbytes <= self.capacity

    def make_room(self, ledger: Ledger, nbytes: int, keep: str | None = None) -> None:
        if self.fits(ledger, nbytes):
            return
        ledger.reclaim_dead(self.paths.tmp)
        resident = self._resident(ledger)
        spilled = self._spilled(ledger)
        while True:
            plan = plan_eviction(resident, spilled, nbytes, self._budget(ledger), keep)
            for step in plan.steps:
                resident = [e for e in resident if e.name != step.name]
                gone = {e.name for e in step.drop_spilled}
                spilled = [e for e in spilled if e.name not in gone]
                if step.link_first:
                    linked = self._link(ledger, step)
                    if linked is not None:
                        resident = [e for e in resident if e.name != linked.name] + [linked]
                        spilled = [e for e in spilled if e.name != linked.name]
                    break  # its name and size changed: plan again
                if not self._evict(ledger, step, keep):
                    break  # the spill failed: plan again with the spill room it left
                if step.spill:
                    spilled.append(Entry(step.name, step.size, _newest(spilled)))
            else:
                break
        if not self.fits(ledger, nbytes):
            raise StoreFull(
                f"cannot fit {nbytes} bytes: {ledger.committed()} of {self.capacity} "
                "are pinned or reserved by writes in flight"
            )

    def _budget(self, ledger: Ledger) -> Budget:
        return Budget(self.capacity, ledger.committed(), self.spill_capacity, ledger.spill_used)

    def _resident(self, ledger: Ledger) -> list[Entry]:
        entries = []
        for directory in (self.paths.objects, self.paths.local):
            for entry in os.scandir(directory):
                if entry.is_file(follow_symlinks=False):
                    stat = entry.stat(follow_symlinks=False)
                    entries.append(
                        Entry(
                            entry.name,
                            stat.st_size,
                            stat.st_mtime_ns,
                            ledger.is_pinned(entry.name),
                            is_local_name(entry.name),
                        )
                    )
        return entries

    def _spilled(self, ledger: Ledger) -> list[Entry]:
        entries = []
        for entry in os.scandir(self.paths.spill_dir):
            if entry.is_file():
                stat = entry.stat()
                entries.append(
                    Entry(entry.name, stat.st_size, stat.st_mtime_ns, ledger.is_pinned(entry.name))
                )
        return entries

    def _link(self, ledger: Ledger, step: Evict) -> Entry | None:
        """Link a local object chosen for eviction under its CID: the entry of that CID's file,
        to be evicted in its place (unless linking freed the room already: a copy was sealed)."""
        cid = self._link_local(ledger, step.name)
        if cid is None:
            return None
        try:
            size = os.stat(self.paths.sealed(cid)).st_size
        except FileNotFoundError:
            return None
        # it keeps the local object's place in the order (the least recently used)
        return Entry(cid, size, -1, ledger.is_pinned(cid))

    def _evict(self, ledger: Ledger, step: Evict, keep: str | None) -> bool:
        """Apply one step; False if its spill failed (the object is dropped all the same)."""
        for dropped in step.drop_spilled:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.paths.spilled(dropped.name))
            ledger.spill_used -= dropped.size
        source = self.paths.sealed(step.name)
        as_planned = True
        if step.spill:
            temp = os.path.join(self.paths.spill_tmp, new_token())
            try:
                shutil.copyfile(source, temp)
                with open(temp, "rb") as file:
                    os.fsync(file.fileno())
                os.replace(temp, self.paths.spilled(step.name))
                ledger.spill_used += step.size
            except OSError:
                as_planned = False
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(temp)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(source)
        ledger.used -= step.size
        (_SPILLED if step.spill and as_planned else _DELETED).add()
        if step.drop_spilled:
            _SPILL_DROPPED.add(len(step.drop_spilled))
        return as_planned

    def restore(self, name: str) -> bool:
        """Bring the object sealed as ``name`` back from the spill directory; False if it is in
        neither place."""
        spilled = self.paths.spilled(name)
        with self.ledger_file.locked() as ledger:
            if os.path.exists(self.paths.sealed(name)):
                return True
            try:
                size = os.stat(spilled).st_size
            except FileNotFoundError:
                return False
            token = self.reserve(ledger, size, keep=name)
            temp = self.paths.temp(token)
            try:
                shutil.copyfile(spilled, temp)
                os.rename(temp, self.paths.sealed(name))
                ledger.used += size
                os.unlink(spilled)
                ledger.spill_used -= size
            except OSError as exc:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(temp)
                if exc.errno != errno.ENOENT:
                    raise
                return False
            finally:
                ledger.release(token)
        return True


def drop_spilled_copy(paths: StorePaths, ledger: Ledger, name: str) -> None:
    """Delete the spilled copy of ``name``, if any (it is sealed in memory again, or deleted)."""
    path = paths.spilled(name)
    with contextlib.suppress(FileNotFoundError):
        size = os.stat(path).st_size
        os.unlink(path)
        ledger.spill_used -= size


def _newest(spilled: list[Entry]) -> int:
    return max((e.last_use for e in spilled), default=0) + 1
