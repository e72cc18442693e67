"""The store's ledger: the byte accounting that every process attached to a store shares.

The ledger is a msgpack file next to the objects, read and written only while holding an
exclusive ``flock`` on the store's ``lock`` file (:meth:`LedgerFile.locked`); a change is written
to a temp file and renamed over it, so a crash never leaves half a ledger. Its fields::

    used          bytes of the files under objects/ and local/ (the regular files: not symlinks)
    spill_used    bytes of the files in the spill directory
    reservations  {token: bytes}: writes in flight and spares (tokens: see layout.py)
    pins          {name: {pid: count}}: objects never evicted nor spilled while pinned
    links         {cid: [local names linked to it, made by a link, writer pid]}

The budget: ``used`` plus every reservation never exceeds the store's capacity
(:meth:`Ledger.committed`); a reservation is taken only once room was made for it (room.py).
What a dead process held (reservations, pins, temp files) is dropped by :meth:`Ledger.recover`
and :meth:`Ledger.reclaim_dead`; ``recover`` also recounts the bytes from the directories.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from collections.abc import Iterator
from typing import Any

import msgpack

from .layout import StorePaths, new_token, pid_alive, token_alive

__all__ = ["Ledger", "LedgerFile"]


class Ledger:
    """The ledger's fields, as loaded under the lock; changes are written back on release."""

    __slots__ = ("_data",)

    def __init__(self, data: dict[str, Any]) -> None:
        data.setdefault("used", 0)
        data.setdefault("spill_used", 0)
        data.setdefault("reservations", {})
        data.setdefault("pins", {})
        data.setdefault("links", {})
        self._data = data

    def encode(self) -> bytes:
        return bytes(msgpack.packb(self._data))

    @property
    def used(self) -> int:
        return int(self._data["used"])

    @used.setter
    def used(self, value: int) -> None:
        self._data["used"] = value

    @property
    def spill_used(self) -> int:
        return int(self._data["spill_used"])

    @spill_used.setter
    def spill_used(self, value: int) -> None:
        self._data["spill_used"] = value

    # --- reservations --------------------------------------------------------------------------
    @property
    def reservations(self) -> dict[str, int]:
        return self._data["reservations"]

    def committed(self) -> int:
        """Bytes counted against the capacity: sealed and local objects plus reservations."""
        return self.used + sum(self.reservations.values())

    def reserve(self, nbytes: int, token: str | None = None) -> str:
        """Record a reservation (the caller made room for it); returns its token."""
        token = new_token() if token is None else token
        self.reservations[token] = nbytes
        return token

    def release(self, token: str) -> None:
        self.reservations.pop(token, None)

    def reserved_as(self, suffix: str, excluding: str | None = None) -> int:
        """Bytes of the reservations whose tokens end in ``suffix`` (spares, gifts)."""
        return sum(v for k, v in self.reservations.items() if k.endswith(suffix) and k != excluding)

    def reclaim_dead(self, tmp_dir: str) -> None:
        """Drop the reservations (writes in flight, spares) and temp files of dead processes."""
        for token in [t for t in self.reservations if not token_alive(t)]:
            del self.reservations[token]
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(tmp_dir, token))

    # --- pins ----------------------------------------------------------------------------------
    def is_pinned(self, name: str) -> bool:
        return name in self._data["pins"]

    def pinned_names(self) -> set[str]:
        return set(self._data["pins"])

    def add_pin(self, name: str) -> None:
        holders = self._data["pins"].setdefault(name, {})
        pid = str(os.getpid())
        holders[pid] = holders.get(pid, 0) + 1

    def remove_pin(self, name: str) -> None:
        """Drop one of this process's pins of ``name``."""
        pid = str(os.getpid())
        holders = self._data["pins"].get(name, {})
        if holders.get(pid, 0) > 1:
            holders[pid] -= 1
        else:
            holders.pop(pid, None)
        if not holders:
            self._data["pins"].pop(name, None)

    def drop_pins(self, name: str) -> None:
        """Forget every pin of ``name`` (it is deleted)."""
        self._data["pins"].pop(name, None)

    def move_pins(self, source: str, target: str) -> None:
        """The pins taken by a local name move to the CID it was linked to."""
        holders = self._data["pins"].pop(source, None)
        if holders:
            merged = self._data["pins"].setdefault(target, {})
            for pid, count in holders.items():
                merged[pid] = merged.get(pid, 0) + count

    def pin_count(self) -> int:
        return len(self._data["pins"])

    # --- links (local names linked to a CID) ---------------------------------------------------
    def link(self, cid: str) -> tuple[int, bool, int] | None:
        """(names linked to ``cid``, whether a link made its file, the writer's pid), or None."""
        entry = self._data["links"].get(cid)
        if entry is None:
            return None
        count, born, writer = (list(entry) + [0, False, 0])[:3]
        return int(count), bool(born), int(writer)

    def set_link(self, cid: str, count: int, born: bool, writer: int) -> None:
        self._data["links"][cid] = [count, born, writer]

    def drop_link(self, cid: str) -> None:
        self._data["links"].pop(cid, None)

    # --- recovery ------------------------------------------------------------------------------
    def recover(self, paths: StorePaths, made_by_link: set[str]) -> None:
        """Drop what dead processes held and recount bytes from the directories (the caller
        has finished interrupted links; ``made_by_link``: CIDs whose file a link made)."""
        for name in os.listdir(paths.tmp):
            if not token_alive(name):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(paths.temp(name))
        self._data["reservations"] = {k: v for k, v in self.reservations.items() if token_alive(k)}
        pins = {}
        for cid, holders in self._data["pins"].items():
            alive = {pid: n for pid, n in holders.items() if pid_alive(int(pid))}
            if alive:
                pins[cid] = alive
        self._data["pins"] = pins
        self.used = sum(e.stat().st_size for e in os.scandir(paths.objects) if e.is_file()) + sum(
            e.stat().st_size for e in os.scandir(paths.local) if e.is_file(follow_symlinks=False)
        )
        counts: dict[str, int] = {}
        for entry in os.scandir(paths.local):
            if entry.is_symlink():
                target = os.path.basename(os.readlink(entry.path))
                counts[target] = counts.get(target, 0) + 1
        old = {cid: self.link(cid) for cid in self._data["links"]}
        self._data["links"] = {}
        for cid, n in counts.items():
            _, born, writer = old.get(cid) or (0, False, 0)
            self.set_link(cid, n, cid in made_by_link or born, writer)
        self.spill_used = sum(e.stat().st_size for e in os.scandir(paths.spill_dir) if e.is_file())


class LedgerFile:
    """The ledger file of one store, locked across processes (flock) and threads (an RLock)."""

    def __init__(self, paths: StorePaths) -> None:
        self.paths = paths
        self._thread_lock = threading.RLock()

    @contextlib.contextmanager
    def locked(self) -> Iterator[Ledger]:
        """Hold the store's lock; yields the ledger, written back if it changed."""
        with self._thread_lock:
            fd = os.open(self.paths.lock, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                ledger = Ledger(self._load())
                before = ledger.encode()
                yield ledger
                after = ledger.encode()
                if after != before:
                    with open(self.paths.ledger + ".tmp", "wb") as file:
                        file.write(after)
                    os.replace(self.paths.ledger + ".tmp", self.paths.ledger)
            finally:
                os.close(fd)  # closing releases the flock

    def _load(self) -> dict[str, Any]:
        try:
            with open(self.paths.ledger, "rb") as file:
                data = msgpack.unpackb(file.read(), strict_map_key=False)
        except FileNotFoundError:
            data = {}
        return data

    def release(self, token: str) -> None:
        """Give a reservation back."""
        with self.locked() as ledger:
            ledger.release(token)
