"""Where a store keeps things and how they are named: directories, local names, tokens, config.

Layout of a store directory (``root``, on tmpfs)::

    config            msgpack {capacity, spill_dir, spill_capacity}: lets other processes attach
    lock              fcntl.flock'ed around every change to the ledger and the objects directory
    ledger            msgpack (see ledger.py)
    objects/<cid>     sealed objects (see fileformat.py)
    local/<name>      objects put by ``put_local``, not hashed yet; once linked under their CID,
                      a symlink to ../objects/<cid>
    tmp/<token>       files being written, and spares; sealed by rename(2), so a half-written
                      object is never visible under objects/ (crash-safe)

A token (``<pid>-<12 hex>`` plus a suffix: ``-warm`` for a spare, ``-gift-warm`` for a file
given back to the process that wrote it) names a reservation in the ledger and its file under
``tmp/``; its pid says whose it is, so the leftovers of dead processes can be reclaimed. A local
name is ``L`` + 32 random hex digits: unguessable, and never shaped like a CID.

The spill directory (on disk) holds evicted objects under their CID, with ``.tmp/`` for spills
being written. Default stores are named ``store-<pid>-<hex>`` under
``/dev/shm/latticaray-<uid>`` (spills under ``<tmp>/latticaray-spill-<uid>``) and are removed
when their process is found dead.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any

import msgpack
import psutil

from .cid import SHA2_256
from .errors import ObjectStoreError

__all__ = [
    "GIFT_SUFFIX",
    "WARM_SUFFIX",
    "StoreConfig",
    "StorePaths",
    "default_capacity",
    "default_root",
    "default_spill_dir",
    "is_local_name",
    "new_local_name",
    "new_token",
    "pid_alive",
    "token_pid",
]

LOCAL_PREFIX = "L"
LOCAL_NAME_HEX = 32
WARM_SUFFIX = "-warm"  # a spare: a reserved temp file waiting for the next large put
GIFT_SUFFIX = "-gift" + WARM_SUFFIX  # a spare handed to the process that wrote it
DEFAULT_RAM_FRACTION = 0.3


def is_local_name(name: Any) -> bool:
    """True for the names ``put_local`` gives (``L`` + 32 hex digits); CIDs never look like it."""
    return (
        isinstance(name, str)
        and len(name) == 1 + LOCAL_NAME_HEX
        and name[0] == LOCAL_PREFIX
        and all(c in "0123456789abcdef" for c in name[1:])
    )


def new_local_name() -> str:
    return LOCAL_PREFIX + secrets.token_hex(LOCAL_NAME_HEX // 2)


def new_token(pid: int | None = None, suffix: str = "") -> str:
    """A fresh reservation token of process ``pid`` (default: this one)."""
    return f"{os.getpid() if pid is None else pid}-{secrets.token_hex(6)}{suffix}"


def token_pid(token: str) -> int | None:
    """The pid a token (or a tmp/ file name) belongs to; None if it does not start with one."""
    pid = token.split("-", 1)[0]
    return int(pid) if pid.isdigit() else None


def pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def token_alive(token: str) -> bool:
    pid = token_pid(token)
    return pid is not None and pid_alive(pid)


@dataclass(frozen=True)
class StorePaths:
    """The paths of one store directory and its spill directory."""

    root: str
    spill_dir: str

    @property
    def objects(self) -> str:
        return os.path.join(self.root, "objects")

    @property
    def tmp(self) -> str:
        return os.path.join(self.root, "tmp")

    @property
    def local(self) -> str:
        return os.path.join(self.root, "local")

    @property
    def spill_tmp(self) -> str:
        return os.path.join(self.spill_dir, ".tmp")

    @property
    def config(self) -> str:
        return os.path.join(self.root, "config")

    @property
    def lock(self) -> str:
        return os.path.join(self.root, "lock")

    @property
    def ledger(self) -> str:
        return os.path.join(self.root, "ledger")

    def sealed(self, name: str) -> str:
        """The file of the object sealed under the CID string ``name``."""
        return os.path.join(self.objects, name)

    def spilled(self, name: str) -> str:
        return os.path.join(self.spill_dir, name)

    def local_file(self, name: str) -> str:
        return os.path.join(self.local, name)

    def temp(self, token: str) -> str:
        return os.path.join(self.tmp, token)

    def make_dirs(self) -> None:
        for path in (self.objects, self.tmp, self.local, self.spill_dir, self.spill_tmp):
            os.makedirs(path, exist_ok=True)

    def own_gifts(self) -> list[str]:
        """Names under tmp/ of the files given back to this process."""
        prefix = f"{os.getpid()}-"
        return [n for n in os.listdir(self.tmp) if n.startswith(prefix) and n.endswith(GIFT_SUFFIX)]


@dataclass(frozen=True)
class StoreConfig:
    """What another process needs to attach: the budget, where spills go, and the multihash its
    CIDs use (every process of a store names a value alike)."""

    capacity: int
    spill_dir: str
    spill_capacity: int
    hash_code: int = SHA2_256

    @classmethod
    def read(cls, root: str) -> StoreConfig:
        try:
            with open(os.path.join(root, "config"), "rb") as file:
                config = msgpack.unpackb(file.read(4096))
        except FileNotFoundError:
            raise ObjectStoreError(f"no object store at {root}") from None
        return cls(
            int(config["capacity"]),
            config["spill_dir"],
            int(config["spill_capacity"]),
            int(config.get("hash_code", SHA2_256)),
        )

    def write(self, root: str) -> None:
        path = os.path.join(root, "config")
        with open(path + ".tmp", "wb") as file:
            file.write(
                msgpack.packb(
                    {
                        "capacity": self.capacity,
                        "spill_dir": self.spill_dir,
                        "spill_capacity": self.spill_capacity,
                        "hash_code": self.hash_code,
                    }
                )
            )
        os.replace(path + ".tmp", path)


def default_capacity(fraction: float = DEFAULT_RAM_FRACTION, shm_root: str = "/dev/shm") -> int:
    """A fraction of RAM, bounded by the free space of the shm filesystem."""
    budget = int(psutil.virtual_memory().total * fraction)
    with contextlib.suppress(OSError):
        budget = min(budget, int(shutil.disk_usage(shm_root).free * 0.9))
    return budget


def _spill_parent() -> str:
    return os.path.join(tempfile.gettempdir(), f"latticaray-spill-{os.getuid()}")


def store_parent() -> str:
    """The directory default stores live in (``/dev/shm/latticaray-<uid>`` where there is one)."""
    return os.path.join(
        "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir(),
        f"latticaray-{os.getuid()}",
    )


def remove_dead_stores() -> int:
    """Remove the default stores (and their spill directories) of processes that died without
    removing them (``kill -9``, a crash), which would otherwise hold shared memory until reboot.
    Returns how many directories were removed."""
    removed = 0
    for directory in (store_parent(), _spill_parent()):
        try:
            names = os.listdir(directory)
        except OSError:
            continue
        for name in names:
            parts = name.split("-")
            if (
                len(parts) == 3
                and parts[0] == "store"
                and parts[1].isdigit()
                and not pid_alive(int(parts[1]))
            ):
                shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
                removed += 1
    return removed


def default_root(clean_dead: bool) -> str:
    """A fresh default store directory's path; ``clean_dead``: first remove the default stores
    of processes that died (:func:`remove_dead_stores`)."""
    if clean_dead:
        remove_dead_stores()
    return os.path.join(store_parent(), f"store-{os.getpid()}-{secrets.token_hex(3)}")


def default_spill_dir(root: str) -> str:
    return os.path.join(_spill_parent(), os.path.basename(root))
