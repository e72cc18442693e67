"""Per-node object store in shared memory (files under /dev/shm, memory-mapped), with a budget.

:class:`LocalStore` is the store's one public face; its parts, one role each:

- layout.py: the directory layout and the names (local names, reservation tokens), the config;
- fileformat.py: the sealed and local object file formats, read and written;
- ledger.py: the shared byte accounting (used, reservations, pins, links) under ``flock``;
- eviction.py: which objects to evict or spill, as a pure function; room.py applies it;
- payload.py: copying a serialized payload into its file and hashing its blocks;
- spares.py: this process's pre-faulted spare file for the next large put (fresh, recycled);
- gifts.py: files of deleted local objects given back to the process that wrote them;
- local_names.py: objects sealed without hashing, linked under their CID on demand;
- writer.py: an object assembled from fetched blocks, each verified.

Budget: bytes under ``objects/`` and ``local/`` plus reservations of writes in flight never
exceed ``capacity``. A put reserves its size first, evicting least-recently-used unpinned
objects (use time = file mtime, touched on ``get``): they are spilled to ``spill_dir`` on disk
while the spill budget allows, else deleted. Pinned objects are never evicted or spilled; a put
that cannot fit beside them raises :class:`StoreFull`. ``get`` of a spilled object restores it
transparently. Two puts of the same content (any processes) keep one copy: the second sees the
sealed CID and discards its temp file (or recycles it as a spare).

Any process on the host may open the same directory (``LocalStore.attach(root)``) and put/get;
reads are zero-copy: ``get`` returns values whose buffers are read-only views of the mapping.
A mapping stays valid after its file is evicted (tmpfs frees the pages when the last view dies).
Why the put paths are shaped as they are (spares, recycling, gifts, local names): measurements
in docs/perf-notes.md, "Object store".

Public API::

    store = LocalStore(root=None, capacity_bytes=None, spill_dir=None, spill_capacity_bytes=None,
                       chunk_size=1 << 20, hash_code=SHA2_256, warm=True, recycle=None)
    client = LocalStore.attach(root)                 # another process on the same host
    cid = store.put(value, pin=False)                # serialize + seal -> root CID (bafyrei...)
    name = store.put_local(value, pin=False)         # seal without hashing -> local name (L...)
    cid = store.resolve(name)                        # hash + link it (once); CIDs pass through
    store.cid_if_resolved(name)                      # its CID if known without hashing, or None
    value = store.get(cid)                           # zero-copy; ObjectNotFound if absent
    obj = store.get_object(cid)                      # StoredObject: .manifest, .payload (memoryview)
    store.contains(cid); store.pin(cid); store.unpin(cid); store.delete(cid); store.stats()
                                                     # (all of these take local names too)
    writer = store.open_writer(manifest)             # for fetched blocks: write_block(i, data), seal()
    store.expect_back(name)                          # a local object of ours is about to be deleted
    store.wait_warm(timeout); store.close()          # the spare: wait for it; give it back
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections import OrderedDict
from typing import Any

from .cid import SHA2_256, Cid
from .errors import ObjectNotFound, ObjectStoreError
from .fileformat import (
    StoredObject,
    local_trailer,
    read_sealed,
    reservation_estimate,
    sealed_size,
    sealed_trailer,
)
from .gifts import Gifts
from .layout import (
    WARM_SUFFIX,
    StoreConfig,
    StorePaths,
    default_capacity,
    default_root,
    default_spill_dir,
    is_local_name,
    new_local_name,
)
from .ledger import Ledger, LedgerFile
from .local_names import LocalNames
from .manifest import DEFAULT_CHUNK_SIZE, Manifest
from .payload import copy_and_hash, copy_payload, write_and_hash
from .room import Room, drop_spilled_copy
from .serialization import SerializedObject, serialize
from .spares import WARM_MIN_BYTES, Spare, SpareKeeper, close_at_exit, forget_at_exit
from .writer import ObjectWriter

__all__ = [
    "RECYCLE_ENV",
    "WARM_MIN_BYTES",
    "LocalStore",
    "ObjectWriter",
    "StoredObject",
    "default_capacity",
    "is_local_name",
]

RECYCLE_ENV = "LATTICARAY_STORE_RECYCLE"  # "0": no recycled spares, no gifts
_GET_RETRIES = 3  # an eviction may race with a read: restore and retry


class LocalStore:
    """The shared-memory object store of one node, attachable from other processes on the host."""

    def __init__(
        self,
        root: str | None = None,
        capacity_bytes: int | None = None,
        spill_dir: str | None = None,
        spill_capacity_bytes: int | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        hash_code: int = SHA2_256,
        warm: bool = True,
        recycle: bool | None = None,
        _attach: bool = False,
    ) -> None:
        if root is None:
            root = default_root(clean_dead=spill_dir is None)
        self.root = os.path.abspath(root)
        self.chunk_size = chunk_size
        if _attach:
            config = StoreConfig.read(self.root)
            hash_code = (
                config.hash_code
            )  # the store's own: a value has one CID in all its processes
        else:
            capacity = int(capacity_bytes) if capacity_bytes is not None else default_capacity()
            spill_dir = spill_dir if spill_dir is not None else default_spill_dir(self.root)
            config = StoreConfig(
                capacity,
                spill_dir,
                int(spill_capacity_bytes) if spill_capacity_bytes is not None else 4 * capacity,
                hash_code,
            )
        self.hash_code = hash_code
        self.capacity = config.capacity
        self.spill_dir = config.spill_dir
        self.spill_capacity = config.spill_capacity
        if recycle is None:
            recycle = os.environ.get(RECYCLE_ENV, "1") not in ("0", "false", "no", "off")
        self.paths = StorePaths(self.root, self.spill_dir)
        self.ledger_file = LedgerFile(self.paths)
        self._manifests: OrderedDict[Cid, Manifest] = OrderedDict()
        self.spares = SpareKeeper(
            self.paths, self.ledger_file, self.capacity, warm, recycle, owner=self
        )
        self.gifts = Gifts(self.paths, self.ledger_file, self.spares)
        self.names = LocalNames(self.paths, self.ledger_file, self._manifests, self.gifts.give)
        self.room = Room(
            self.paths,
            self.ledger_file,
            self.capacity,
            self.spill_capacity,
            self.names.link_for_eviction,
        )
        if _attach:
            return
        self.paths.make_dirs()
        with self.ledger_file.locked() as ledger:
            config.write(self.root)
            ledger.recover(self.paths, self.names.recover(self.hash_code))

    @classmethod
    def attach(cls, root: str) -> LocalStore:
        """Open an existing store directory from another process (the same-host client)."""
        return cls(root, _attach=True)

    # --- observability (tests, benchmarks) ------------------------------------------------------
    @property
    def warm_enabled(self) -> bool:
        return self.spares.enabled

    @property
    def recycle_enabled(self) -> bool:
        return self.spares.recycle_enabled

    @property
    def spares_made(self) -> int:
        return self.spares.spares_made

    @property
    def spares_recycled(self) -> int:
        return self.spares.spares_recycled

    @property
    def gifts_taken(self) -> int:
        return self.gifts.gifts_taken

    @property
    def gifts_reused_mapping(self) -> int:
        return self.gifts.gifts_reused_mapping

    # --- writing -------------------------------------------------------------------------------
    def open_writer(self, manifest: Manifest) -> ObjectWriter:
        """Reserve room for ``manifest``'s object and return a writer for its blocks."""
        with self.ledger_file.locked() as ledger:
            token = self.room.reserve(ledger, sealed_size(manifest))
        try:
            return ObjectWriter(
                manifest, self.paths.temp(token), token, self._seal, self.ledger_file.release
            )
        except BaseException:
            self.ledger_file.release(token)
            raise

    def link_from(self, source: LocalStore, cid: Cid | str) -> int:
        """Bring the sealed object ``cid`` of ``source`` (another store on this filesystem: a
        node on the same host) into this store without copying: its file is hard-linked here.
        The manifest is checked against ``cid`` (``source.get_object``); the bytes are the
        ones ``source`` sealed (a process of the same user could write either store's files
        anyway). Neither store recycles a file that has another link (spares, gifts), so the
        shared file stays as sealed. Returns the payload size (0 if this store has it already);
        raises ObjectNotFound, or OSError where a link is impossible (another filesystem)."""
        cid = Cid.coerce(cid)
        if self.contains(cid):
            return 0
        stored = source.get_object(cid)
        manifest = stored.manifest
        with contextlib.suppress(BufferError):
            stored.payload.release()
        with self.ledger_file.locked() as ledger:
            token = self.room.reserve(ledger, sealed_size(manifest))
        temp = self.paths.temp(token)
        try:
            # under the source's lock: it neither recycles nor gives the file away meanwhile
            with source.ledger_file.locked():
                os.link(source.paths.sealed(str(cid)), temp)
        except BaseException:
            self.ledger_file.release(token)
            raise
        self._seal(manifest, temp, token, False)
        return manifest.size

    def put(self, value: Any, pin: bool = False) -> Cid:
        """Serialize ``value`` into the store; return its root CID (deduplicated by content)."""
        return self.put_serialized(serialize(value), pin=pin)

    def put_local(self, value: Any, pin: bool = False) -> str:
        """Serialize ``value`` into the store without hashing it; return its local name.

        The object is sealed (complete, crash-safe, readable by every process of the host that
        is given the name) at once; its CID is computed later, by ``resolve`` (local_names.py)."""
        return self.put_serialized_local(serialize(value), pin=pin)

    def _take_spare(self, ser: SerializedObject, estimate: int) -> Spare | None:
        if ser.nbytes < WARM_MIN_BYTES:
            return None
        return self.spares.take(estimate) or self.gifts.take(estimate)

    def _reserve_temp(self, estimate: int) -> tuple[str, str]:
        """A reservation for a put without a spare, and its (new, empty) temp file."""
        with self.ledger_file.locked() as ledger:
            self.spares.give_room(ledger, estimate)  # our idle spare gives its room back first
            token = self.room.reserve(ledger, estimate)
        path = self.paths.temp(token)
        try:
            os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))
        except BaseException:
            self.ledger_file.release(token)
            raise
        return token, path

    def _discard_temp(self, token: str, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        self.ledger_file.release(token)

    def put_serialized_local(self, ser: SerializedObject, pin: bool = False) -> str:
        estimate = reservation_estimate(ser, self.chunk_size)
        writer = os.getpid() if self.recycle_enabled else 0  # who takes its file back (gifts)
        trailer = local_trailer(ser.nbytes, self.chunk_size, self.hash_code, ser.meta, writer)
        if ser.nbytes + len(trailer) > estimate:
            raise ObjectStoreError("internal error: local trailer larger than its reservation")
        started = time.monotonic()
        name = new_local_name()
        if writer and ser.nbytes >= WARM_MIN_BYTES:
            close_at_exit(self)  # its file may come back: given-back spares go at exit
        spare = self._take_spare(ser, estimate)
        fresh = spare is None or not spare.recycled  # else deletes are feeding spares
        try:
            if spare is not None:
                path, token = spare.path, spare.token
                try:
                    with memoryview(spare.map) as view, view[: ser.nbytes] as payload:
                        copy_payload(ser, payload, zero_first=spare.recycled)
                    # the file keeps the reserved size, so linking it under its CID later
                    # writes the manifest in place and only shrinks it (the budget holds); cut
                    # to the payload first, so no byte of a recycled file's object survives
                    os.ftruncate(spare.fd, ser.nbytes)
                    os.ftruncate(spare.fd, estimate)
                    if os.pwrite(spare.fd, trailer, estimate - len(trailer)) != len(trailer):
                        raise ObjectStoreError("short write of a local object's trailer")
                    self.spares.retain(spare)
                except BaseException:
                    self.spares.discard(spare)
                    raise
            else:
                token, path = self._reserve_temp(estimate)
                try:
                    ser.write_to_file(path)
                    with open(path, "r+b") as file:
                        file.truncate(estimate)
                        file.seek(estimate - len(trailer))
                        file.write(trailer)
                except BaseException:
                    self._discard_temp(token, path)
                    raise
            with self.ledger_file.locked() as ledger:
                ledger.release(token)
                try:
                    os.rename(path, self.paths.local_file(name))
                except BaseException:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)
                    raise
                ledger.used += estimate
                if pin:
                    ledger.add_pin(name)
            return name
        finally:
            if ser.nbytes >= WARM_MIN_BYTES:
                self.spares.schedule(estimate, started, fresh=fresh)

    def put_serialized(self, ser: SerializedObject, pin: bool = False) -> Cid:
        estimate = reservation_estimate(ser, self.chunk_size)
        started = time.monotonic()
        spare = self._take_spare(ser, estimate)
        fresh = spare is None or not spare.recycled  # else deletes are feeding spares
        if spare is not None:
            manifest, duplicate = self._put_into_spare(ser, spare, estimate, pin)
            path, token = spare.path, spare.token
        else:
            duplicate = False
            token, path = self._reserve_temp(estimate)
            try:
                manifest = write_and_hash(ser, path, self.chunk_size, self.hash_code)
                if sealed_size(manifest) > estimate:
                    raise ObjectStoreError("internal error: manifest larger than its reservation")
                with open(path, "r+b") as file:
                    file.truncate(manifest.size)
                    file.seek(manifest.size)
                    file.write(sealed_trailer(manifest))
            except BaseException:
                self._discard_temp(token, path)
                raise
        self._manifests[manifest.root] = manifest
        try:
            if duplicate:
                return manifest.root
            return self._seal(manifest, path, token, pin)
        finally:
            if ser.nbytes >= WARM_MIN_BYTES:
                self.spares.schedule(estimate, started, fresh=fresh)

    def _put_into_spare(
        self, ser: SerializedObject, spare: Spare, estimate: int, pin: bool
    ) -> tuple[Manifest, bool]:
        """Write the payload straight into the pre-faulted mapping, hash it, trim and trail it.
        If the object turns out to be sealed already (a duplicate put), the spare stays this
        process's spare, untouched but for the bytes just written: (manifest, True)."""
        try:
            view = memoryview(spare.map)
            try:
                payload = view[: ser.nbytes]
                manifest = copy_and_hash(
                    ser, payload, self.chunk_size, self.hash_code, zero_first=spare.recycled
                )
                payload.release()
            finally:
                view.release()
            if sealed_size(manifest) > estimate:
                raise ObjectStoreError("internal error: manifest larger than its reservation")
            if self.recycle_enabled and self._touch_if_sealed(manifest, pin):
                self.spares.install(spare)
                return manifest, True
            trailer = sealed_trailer(manifest)
            os.ftruncate(spare.fd, manifest.size)  # frees the spare's unused pages
            if os.pwrite(spare.fd, trailer, manifest.size) != len(trailer):
                raise ObjectStoreError(f"short write of the manifest of {manifest.root}")
            self.spares.spent(spare)
            return manifest, False
        except BaseException:
            self.spares.discard(spare)
            raise

    def _touch_if_sealed(self, manifest: Manifest, pin: bool) -> bool:
        """True if ``manifest``'s object is already sealed (marked used, pinned if asked)."""
        name = str(manifest.root)
        final = self.paths.sealed(name)
        if not os.path.exists(final):
            return False
        with self.ledger_file.locked() as ledger:
            try:
                os.utime(final)
            except FileNotFoundError:
                return False  # deleted meanwhile: seal ours
            if pin:
                ledger.add_pin(name)
        return True

    def _seal(self, manifest: Manifest, temp: str, token: str, pin: bool) -> Cid:
        """Make the written temp file ``temp`` the sealed object (or, if a copy is sealed
        already, recycle or drop it), giving its reservation back."""
        name = str(manifest.root)
        final = self.paths.sealed(name)
        recycled = None
        with self.ledger_file.locked() as ledger:
            ledger.release(token)
            if os.path.exists(final):  # a duplicate: its freshly written file may be recycled
                recycled = self.spares.recycle(ledger, temp, sealed=False)
                if recycled is None:
                    os.unlink(temp)
                os.utime(final)
            else:
                drop_spilled_copy(self.paths, ledger, name)
                os.rename(temp, final)
                ledger.used += os.stat(final).st_size
            if pin:
                ledger.add_pin(name)
        self.spares.start_recycle(recycled)
        return manifest.root

    # --- local names ---------------------------------------------------------------------------
    def resolve(self, name: str | Cid) -> Cid:
        """The CID of a local name: hashes the object (once, by whichever process asks first)
        and links it under its CID (deduplicated against a copy sealed already)."""
        if not is_local_name(name):
            return Cid.coerce(name)
        return self.names.resolve(str(name))

    def cid_if_resolved(self, name: str | Cid) -> Cid | None:
        """The CID of ``name`` if it is known without hashing (a CID, or a linked local name)."""
        if not is_local_name(name):
            return Cid.coerce(name)
        return self.names.alias(str(name))

    def expect_back(self, name: str) -> None:
        """This process dropped its last reference to its local object ``name``: the next put
        waits briefly for its file to come back as a spare (gifts.py)."""
        self.gifts.expect_back(name)

    # --- reading -------------------------------------------------------------------------------
    def get_object(self, cid: Cid | str) -> StoredObject:
        """Map a sealed object read-only (restoring it from spill if needed); a local name is
        resolved first (its manifest names its blocks)."""
        cid = self.resolve(cid)
        path = self.paths.sealed(str(cid))
        for _ in range(_GET_RETRIES):
            try:
                stored = read_sealed(cid, path, self._manifests)
            except FileNotFoundError:
                if not self.room.restore(str(cid)):
                    raise ObjectNotFound(cid) from None
                continue
            with contextlib.suppress(FileNotFoundError):
                os.utime(path)
            return stored
        raise ObjectNotFound(cid, "object kept being evicted while being read")

    def get(self, cid: Cid | str) -> Any:
        """The deserialized value; arrays are read-only views into shared memory. Accepts a
        CID or a local name (read without hashing while it is unresolved)."""
        if is_local_name(cid):
            return self.names.read_value(str(cid), lambda linked: self.get_object(linked).value())
        return self.get_object(cid).value()

    def manifest(self, cid: Cid | str) -> Manifest:
        cid = self.resolve(cid)
        manifest = self._manifests.get(cid)
        return manifest if manifest is not None else self.get_object(cid).manifest

    def contains(self, cid: Cid | str) -> bool:
        if self.names.unresolved_path(cid) is not None:
            return True
        known = self.names.known_cid(cid)
        if known is None:
            return False
        name = str(known)
        return os.path.exists(self.paths.sealed(name)) or os.path.exists(self.paths.spilled(name))

    def in_memory(self, cid: Cid | str) -> bool:
        if self.names.unresolved_path(cid) is not None:
            return True
        known = self.names.known_cid(cid)
        return known is not None and os.path.exists(self.paths.sealed(str(known)))

    def is_spilled(self, cid: Cid | str) -> bool:
        known = self.names.known_cid(cid)
        if known is None:
            return False
        return not self.in_memory(known) and os.path.exists(self.paths.spilled(str(known)))

    def list(self) -> list[Cid]:
        names = set(os.listdir(self.paths.objects)) | {
            n for n in os.listdir(self.spill_dir) if n != ".tmp"
        }
        return [Cid.parse(n) for n in sorted(names)]

    # --- pins, deletion, stats -----------------------------------------------------------------
    def pin(self, cid: Cid | str) -> None:
        """Keep the object in memory (never evicted or spilled) until as many ``unpin`` calls."""
        if is_local_name(cid):
            with self.ledger_file.locked() as ledger:  # linking moves pins under the lock
                if self.names.alias(str(cid)) is None:
                    ledger.add_pin(str(cid))
                    return
            cid = self.resolve(cid)
        cid = Cid.coerce(cid)
        if not self.in_memory(cid) and not self.room.restore(str(cid)):
            raise ObjectNotFound(cid)
        with self.ledger_file.locked() as ledger:
            ledger.add_pin(str(cid))

    def _pin_name(self, ledger: Ledger, cid: Cid | str) -> str | None:
        """The name ``cid``'s pins are held under: an unresolved local name pinned by name, or
        the CID it stands for; None for an unknown or unpinned unresolved local name."""
        if is_local_name(cid) and ledger.is_pinned(str(cid)):
            return str(cid)
        known = self.names.known_cid(cid)
        return None if known is None else str(known)

    def unpin(self, cid: Cid | str) -> None:
        with self.ledger_file.locked() as ledger:
            name = self._pin_name(ledger, cid)
            if name is not None:
                ledger.remove_pin(name)

    def is_pinned(self, cid: Cid | str) -> bool:
        with self.ledger_file.locked() as ledger:
            name = self._pin_name(ledger, cid)
            return name is not None and ledger.is_pinned(name)

    def delete(self, cid: Cid | str) -> None:
        """Remove the object (memory and spill) and its pins; a large one's file may become this
        process's spare (spares.py). Deleting a local name removes the name; the object it was
        linked to goes with the last such name, unless it was sealed under its CID before any
        of them (then it stays, evictable, until deleted)."""
        with self.ledger_file.locked() as ledger:
            if is_local_name(cid):
                last = self.names.delete(ledger, str(cid))
                recycled = self._delete_sealed(ledger, *last) if last is not None else None
            else:
                recycled = self._delete_sealed(ledger, str(Cid.coerce(cid)))
        self.spares.start_recycle(recycled)

    def _delete_sealed(self, ledger: Ledger, name: str, writer: int = 0) -> tuple[str, int] | None:
        ledger.drop_pins(name)
        ledger.drop_link(name)  # local names linked to it now lead nowhere
        path = self.paths.sealed(name)
        recycled = None
        if not (writer and self.gifts.give(ledger, path, writer)):
            recycled = self.spares.recycle(ledger, path, sealed=True)
        with contextlib.suppress(FileNotFoundError):
            size = os.stat(path).st_size
            os.unlink(path)
            ledger.used -= size
        drop_spilled_copy(self.paths, ledger, name)
        self._manifests.pop(Cid.parse(name), None)
        return recycled

    def stats(self) -> dict[str, int]:
        with self.ledger_file.locked() as ledger:
            warm = ledger.reserved_as(WARM_SUFFIX)
            local = self.names.count_unresolved()
            return {
                "local": local,
                "capacity": self.capacity,
                "used": ledger.used,
                "reserved": sum(ledger.reservations.values()) - warm,
                "warm": warm,
                "spill_capacity": self.spill_capacity,
                "spill_used": ledger.spill_used,
                "objects": len(os.listdir(self.paths.objects)) + local,
                "pinned": ledger.pin_count(),
                "spilled": len(os.listdir(self.spill_dir)) - 1,
            }

    # --- the spare, teardown -------------------------------------------------------------------
    def wait_warm(self, timeout: float) -> bool:
        """Wait (bounded) until no spare is being prepared; True if a spare is ready."""
        return self.spares.wait(timeout)

    def close(self) -> None:
        """Release this process's spare and given-back files (the store's objects stay)."""
        forget_at_exit(self)
        self.spares.close()
        self.gifts.close()

    def destroy(self) -> None:
        """Delete the store directory and its spill directory (for tests and node shutdown)."""
        forget_at_exit(self)
        self.spares.close(give_back=False)
        shutil.rmtree(self.root, ignore_errors=True)
        shutil.rmtree(self.spill_dir, ignore_errors=True)
