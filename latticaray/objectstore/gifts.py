"""Gifts: the file of a deleted local object goes back, as a spare, to the process that wrote it.

Back-to-back local puts (the runtime's path: a worker puts, the node deletes once no reference
is left): a local object's trailer names its writer (and the ledger's ``links`` keep it once
linked). When an unresolved local object is deleted (by any process), or the last name of an
object its link sealed, its file (>= ``WARM_MIN_BYTES``) is renamed to
``tmp/<writer pid>-<id>-gift-warm`` and its bytes become a reservation of the writer, instead of
being unlinked (:meth:`Gifts.give`; given-back files of all processes stay within
``capacity // 8``, apart from fresh spares; gifts given earlier and still not taken give way to
a newer one, so a process that stopped putting cannot keep every other writer's files from
coming back). The writer's next put that finds no spare takes it
(:meth:`Gifts.take`): it proves with the write lease that no one else has the file open or
mapped (else it unlinks it: readers keep their bytes), and writes through the mapping it kept
when it wrote the file (spares.py), so the put is a plain memcpy into mapped, resident pages.
The lease is taken on the kept fd itself, which the kernel counts as the only opener when nobody
else has the file. A process that drops its last reference to an object it put
(:meth:`Gifts.expect_back`) lets its next put wait, at most a quarter of what fresh pages would
cost, for that file to come back. ``warm=False`` or ``LATTICARAY_STORE_RECYCLE=0`` (of the writer
or of the deleter) turn gifts off. Before a given-back file is written, it is cut to the new
payload's size, so nothing of the old object survives.
"""

from __future__ import annotations

import collections
import contextlib
import os
import threading
import time

from .errors import ObjectStoreError
from .fileformat import TornRead, read_local
from .layout import GIFT_SUFFIX, StorePaths, is_local_name, new_token, pid_alive
from .ledger import Ledger, LedgerFile
from .spares import WARM_MIN_BYTES, Spare, SpareKeeper, prove_unshared, round_to_granule

__all__ = ["Gifts"]

_EXPECTED_MAX = 4
# the wait for an expected file: a quarter of what fresh pages would cost (docs/perf-notes.md)
_EXPECTED_WAIT_BYTES_PER_S = 8e9
_EXPECTED_WAIT_MAX = 0.25


class Gifts:
    """Files given back to this process, and the ones it expects back."""

    def __init__(self, paths: StorePaths, ledger_file: LedgerFile, keeper: SpareKeeper) -> None:
        self.paths = paths
        self.ledger_file = ledger_file
        self.keeper = keeper
        self.gifts_taken = 0  # given-back files this process reused (observability; tests)
        self.gifts_reused_mapping = 0  # of which it still had mapped
        self.gifts_dropped = 0  # idle gifts this process dropped for newer ones (observability)
        self._lock = threading.Lock()
        self._expected: collections.deque[str] = collections.deque(maxlen=_EXPECTED_MAX)
        self._pid = os.getpid()

    def give(self, ledger: Ledger, path: str, writer: int | None = None) -> bool:
        """Hand the file of a deleted object (an unresolved local object, whose trailer names
        its writer; or a sealed one whose ``writer`` is known) to the process that wrote it, as
        a spare (the caller holds the ledger lock). False when it is to be unlinked instead."""
        if not self.keeper.recycle_enabled:
            return False
        try:
            info = os.stat(path)
            if info.st_nlink > 1:  # linked into another store (store.link_from): shared
                return False
            size = info.st_size
            if writer is None:
                writer = read_local(path, map_payload=False).writer if size >= WARM_MIN_BYTES else 0
        except (OSError, TornRead, ObjectStoreError):
            return False
        if size < WARM_MIN_BYTES or not writer or not pid_alive(writer):
            return False
        rounded = round_to_granule(size)
        capacity = self.keeper.capacity
        if ledger.committed() - size + rounded > capacity:
            return False
        # given-back files have a cap of their own (a fresh spare that a starved, niced thread
        # is still making must not keep pages that exist from being reused); within it, this
        # file is worth more than gifts that were given earlier and are still not taken (their
        # writer stopped putting, or puts smaller objects now): those go first
        if not self._make_gift_room(ledger, rounded, capacity // 8):
            return False
        token = new_token(writer, GIFT_SUFFIX)
        try:
            os.rename(path, self.paths.temp(token))
        except OSError:
            return False
        ledger.used -= size
        ledger.reserve(rounded, token)
        return True

    def _make_gift_room(self, ledger: Ledger, nbytes: int, cap: int) -> bool:
        """Drop idle gifts, those given longest ago first, until ``nbytes`` more fit in ``cap``
        (the caller holds the ledger lock); False if they cannot. A gift being taken was renamed
        to a plain token under this lock, so every ``-gift-warm`` file here is idle."""
        given = ledger.reserved_as(GIFT_SUFFIX)
        if given + nbytes <= cap:
            return True
        if nbytes > cap:
            return False
        idle = []
        for token in [t for t in ledger.reservations if t.endswith(GIFT_SUFFIX)]:
            try:
                idle.append((os.stat(self.paths.temp(token)).st_ctime_ns, token))
            except FileNotFoundError:
                idle.append((0, token))  # its file is gone already: only the entry is left
        for _, token in sorted(idle):
            if given + nbytes <= cap:
                break
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.paths.temp(token))
            given -= ledger.reservations[token]
            ledger.release(token)
            self.gifts_dropped += 1
        return given + nbytes <= cap

    def take(self, estimate: int) -> Spare | None:
        """A file given back to this process that fits ``estimate``, made this put's spare
        (proven unshared first); gifts that do not fit are given up."""
        self.keeper.drop_stale_retained()
        names = self.paths.own_gifts()
        if not names:  # listed again either way: a file may have come back meanwhile
            self.await_expected(estimate)
            names = self.paths.own_gifts()
        if not names:
            return None
        chosen = None
        with self.ledger_file.locked() as ledger:
            for name in names:
                size = ledger.reservations.get(name)
                if size is None:
                    continue
                if chosen is None and size >= estimate:
                    # in use from now on: no longer an idle spare (the spares' cap is for those)
                    token = new_token()
                    path = self.paths.temp(token)
                    with contextlib.suppress(FileNotFoundError):
                        os.rename(self.paths.temp(name), path)
                        ledger.release(name)
                        ledger.reserve(size, token)
                        chosen = (path, token, size)
                        continue
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.paths.temp(name))
                ledger.release(name)
        if chosen is None:
            return None
        path, token, size = chosen
        try:
            spare = self._adopt(path, token, size)
        except OSError:  # someone still has it open or mapped: it goes as a plain delete would
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            self.ledger_file.release(token)
            return None
        self.gifts_taken += 1
        self.keeper.abandon_fresh()
        return spare

    def _adopt(self, path: str, token: str, size: int) -> Spare:
        """Make the given-back file at ``path`` a spare: through the mapping this process kept
        of it when it wrote it (no mapping or page-table work at all), else mapped anew."""
        stat = os.stat(path)
        retained = self.keeper.take_retained(stat.st_dev, stat.st_ino)
        if retained is not None and retained.size < size:
            self.keeper.unmap_later(retained)
            retained = None
        if retained is None:
            return Spare(path, token, size, recycled=True)
        try:
            # the write lease is taken on the very file the mapping holds: granted only if no
            # other process (nor another open file here) has the inode open or mapped
            prove_unshared(retained.fd)
            if os.fstat(retained.fd).st_size < size:
                os.ftruncate(retained.fd, size)  # its pages up to there exist and are mapped
        except OSError:
            self.keeper.unmap_later(retained)
            raise
        retained.path, retained.token, retained.size, retained.recycled = path, token, size, True
        self.gifts_reused_mapping += 1
        return retained

    def expect_back(self, name: str) -> None:
        """This process dropped its last reference to its local object ``name``: whoever deletes
        it gives its file back here, soon. The next put that finds no spare waits for that
        (bounded) rather than write fresh pages (which the kernel must zero)."""
        if self.keeper.recycle_enabled and is_local_name(name):
            with self._lock:
                self._forget_parents()
                self._expected.append(name)

    def await_expected(self, estimate: int) -> bool:
        """Wait for the files of the expected names to leave ``local/``, at most a quarter of
        what writing ``estimate`` fresh bytes would cost; True if one did."""
        with self._lock:
            self._forget_parents()
            expected = list(self._expected)
            self._expected.clear()
        if not expected:
            return False
        deadline = time.monotonic() + min(_EXPECTED_WAIT_MAX, estimate / _EXPECTED_WAIT_BYTES_PER_S)
        # names gone already were dealt with by earlier puts (taken, or not given back)
        pending = [p for p in map(self.paths.local_file, expected) if os.path.lexists(p)]
        while pending:
            if any(not os.path.lexists(p) for p in pending):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.0002)
        return False

    def _forget_parents(self) -> None:
        """After a fork, the names the parent expects back are not the child's (the caller
        holds ``_lock``)."""
        if self._pid != os.getpid():
            self._pid = os.getpid()
            self._expected.clear()

    def close(self) -> None:
        """Give up the files given back to this process."""
        with contextlib.suppress(FileNotFoundError):
            names = self.paths.own_gifts()
            if names:
                with self.ledger_file.locked() as ledger:
                    for name in names:
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(self.paths.temp(name))
                        ledger.release(name)
