"""An object being assembled block by block from peers: every block verified, then sealed.

:class:`ObjectWriter` writes fetched blocks into a reserved temp file (``LocalStore.open_writer``),
each checked against the manifest before it is accepted, and serves the blocks it has to peers
while the fetch runs. ``seal`` writes the manifest and trailer and hands the file to the store,
which makes it visible atomically (rename(2)); ``abort`` discards it and its reservation.
"""

from __future__ import annotations

import contextlib
import mmap
import os
from collections.abc import Callable

from .cid import Cid
from .errors import BlockVerificationError, ObjectStoreError
from .fileformat import sealed_trailer
from .manifest import Manifest

__all__ = ["ObjectWriter"]

#: seals the written temp file: (manifest, temp path, reservation token, pin) -> root CID
Seal = Callable[[Manifest, str, str, bool], Cid]


class ObjectWriter:
    """An object being assembled in a temp file (from fetched blocks).

    ``write_block`` verifies each block against the manifest before accepting it. ``seal`` makes
    the object visible atomically; ``abort`` discards it and releases its reservation.
    """

    def __init__(
        self,
        manifest: Manifest,
        temp_path: str,
        reservation: str,
        seal: Seal,
        release: Callable[[str], None],
    ) -> None:
        self.manifest = manifest
        self._path = temp_path
        self._reservation = reservation
        self._seal = seal
        self._release = release
        self._have = bytearray(len(manifest.blocks))
        self._missing = len(manifest.blocks)
        # blocks are written with pwrite (cheaper than faulting fresh tmpfs pages through a
        # mapping) and read back, for peers we serve while fetching, through a read-only mapping
        self._fd = os.open(temp_path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(self._fd, max(manifest.size, 1))
            self._map = mmap.mmap(self._fd, max(manifest.size, 1), access=mmap.ACCESS_READ)
        except BaseException:
            os.close(self._fd)
            raise
        self._view = memoryview(self._map)[: manifest.size]
        self._done = False

    @property
    def root(self) -> Cid:
        return self.manifest.root

    def has_block(self, index: int) -> bool:
        return bool(self._have[index])

    def have_bitmap(self) -> bytes:
        return bytes(self._have)

    def missing_blocks(self) -> list[int]:
        return [i for i, have in enumerate(self._have) if not have]

    @property
    def complete(self) -> bool:
        return self._missing == 0

    def write_block(self, index: int, data: bytes | memoryview) -> bool:
        """Verify and store block ``index``; False if it was already present."""
        if self._done:
            raise ObjectStoreError("writer already sealed or aborted")
        if not 0 <= index < len(self._have):
            raise IndexError(f"block index {index} out of range")
        if self._have[index]:
            return False
        expected = self.manifest.blocks[index]
        if len(data) != self.manifest.sizes[index] or not expected.verify(data):
            raise BlockVerificationError(expected)
        start, _ = self.manifest.block_range(index)
        written = os.pwrite(self._fd, data, start)
        while written < len(data):  # pwrite may write less on huge buffers
            written += os.pwrite(self._fd, memoryview(data)[written:], start + written)
        self._have[index] = 1
        self._missing -= 1
        return True

    def read_block(self, index: int) -> memoryview | None:
        if self._done or not self._have[index]:
            return None  # sealed (now served from the store) or aborted, or not here yet
        start, end = self.manifest.block_range(index)
        return self._view[start:end]

    def payload_view(self) -> memoryview:
        return self._view

    def seal(self, pin: bool = False) -> Cid:
        if not self.complete:
            raise ObjectStoreError(f"cannot seal {self.root}: {self._missing} blocks missing")
        self._release_mapping()
        with open(self._path, "r+b") as file:
            file.truncate(self.manifest.size)
            file.seek(self.manifest.size)
            file.write(sealed_trailer(self.manifest))
        self._done = True
        return self._seal(self.manifest, self._path, self._reservation, pin)

    def abort(self) -> None:
        if self._done:
            return
        self._done = True
        self._release_mapping()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path)
        self._release(self._reservation)

    def _release_mapping(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._view.release()
        try:
            self._map.close()
        except BufferError:  # a block view handed out is still alive; the GC closes it later
            pass

    def __del__(self) -> None:  # pragma: no cover - safety net
        with contextlib.suppress(Exception):
            self.abort()
