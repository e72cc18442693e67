"""Local names: objects sealed without hashing, named ``L...``, linked under their CID on demand.

Hashing every block costs more than copying it, and most objects are only ever read on this
host. So ``put_local`` seals the payload under ``local/<name>`` (``name``: unguessable, readable
by every process of the host that is given it; :meth:`LocalNames.read_value` maps it zero-copy). The
CID is computed by :meth:`LocalNames.resolve`, by whichever process asks first (the runtime asks
when ``ref.cid`` is read and when a reference or the object leaves the node): it hashes the
blocks from the mapping, then under the ledger lock seals the file in place (fileformat.py),
links it as ``objects/<cid>`` (a hard link) and replaces ``local/<name>`` by a symlink to it. If
that CID is sealed already the local file is dropped instead (dedup; given back to its writer
when resolving, see gifts.py). A store opened after a crash finishes a link cut short, or
restores the voided magic (:meth:`LocalNames.recover`).

The ledger's ``links`` counts the names linked to each CID: deleting a linked name deletes the
object with the last name, unless the object was sealed under its CID before any of them, or a
holder of the CID itself still needs it (``keep``; ``LocalStore.release``). Pins taken by name
move to the CID when it is linked. Eviction links a local object first (the spill
is named by CID; room.py).
"""

from __future__ import annotations

import errno
import os
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from .cid import Cid, hash_digest
from .errors import ObjectNotFound
from .fileformat import TornRead, read_local, repair_local, seal_local_in_place
from .layout import StorePaths, is_local_name, new_token
from .ledger import Ledger, LedgerFile
from .manifest import Manifest, block_spans, hash_pool, manifest_from_digests
from .room import drop_spilled_copy
from .serialization import deserialize

__all__ = ["LocalNames", "hash_local_file"]

_RETRIES = 3  # a local object being linked right now is read again, via its symlink

#: gives the file of a dropped object back to its writer (gifts.py): False to unlink it instead
GiveBack = Callable[[Ledger, str, "int | None"], bool]


def hash_local_file(path: str) -> tuple[Manifest, int]:
    """The manifest of an unresolved local object, and its writer (0: none to give back to)."""
    local = read_local(path)
    try:
        spans = block_spans(local.nbytes, local.chunk)
        payload = local.payload
        digests = list(
            hash_pool().map(
                lambda span: hash_digest(local.hash_code, payload[span[0] : span[1]]), spans
            )
        )
    finally:
        local.payload.release()
    return manifest_from_digests(
        local.nbytes, local.chunk, digests, local.meta, local.hash_code
    ), local.writer


class LocalNames:
    """The local names of one store: what they are linked to, resolving, deleting, recovery."""

    def __init__(
        self,
        paths: StorePaths,
        ledger_file: LedgerFile,
        manifests: OrderedDict[Cid, Manifest],
        give_back: GiveBack,
    ) -> None:
        self.paths = paths
        self.ledger_file = ledger_file
        self._manifests = manifests  # the store's manifest cache: linking adds to it
        self._give_back = give_back

    def alias(self, name: str) -> Cid | None:
        """The CID a local name was linked to; None while it is unresolved. ObjectNotFound if
        the name is unknown (never put, or deleted)."""
        try:
            return Cid.parse(os.path.basename(os.readlink(self.paths.local_file(name))))
        except OSError as exc:
            if exc.errno == errno.EINVAL:
                return None  # a regular file: not linked yet
            if exc.errno == errno.ENOENT:
                raise ObjectNotFound(name) from None
            raise

    def known_cid(self, name: Cid | str) -> Cid | None:
        """``name`` as a CID if it is one or a linked local name; None for an unresolved or
        unknown local name."""
        if not is_local_name(name):
            return Cid.coerce(name)
        try:
            return self.alias(str(name))
        except ObjectNotFound:
            return None

    def unresolved_path(self, name: Any) -> str | None:
        """The path of ``name`` if it is a local name whose object is not linked to a CID yet."""
        if not is_local_name(name):
            return None
        path = self.paths.local_file(name)
        return path if os.path.isfile(path) and not os.path.islink(path) else None

    def count_unresolved(self) -> int:
        return sum(1 for e in os.scandir(self.paths.local) if e.is_file(follow_symlinks=False))

    def resolve(self, name: str) -> Cid:
        """The CID of a local name: hashes the object (once, by whichever process asks first)
        and links it under its CID (deduplicated against a copy sealed already)."""
        for _ in range(_RETRIES):
            cid = self.alias(name)
            if cid is not None:
                return cid
            try:
                manifest, writer = hash_local_file(self.paths.local_file(name))
            except (FileNotFoundError, TornRead):
                continue  # linked meanwhile by another process: the alias says where
            with self.ledger_file.locked() as ledger:
                return self.link(ledger, name, manifest, writer, gift=True)
        raise ObjectNotFound(name, "local object kept changing while being resolved")

    def link_for_eviction(self, ledger: Ledger, name: str) -> str | None:
        """Link ``name`` under its CID so it can be spilled (the caller holds the lock): the
        CID, or None if the object is gone. A duplicate's file is not given back: eviction
        runs precisely when room is needed."""
        try:
            manifest, writer = hash_local_file(self.paths.local_file(name))
        except (FileNotFoundError, TornRead):
            return None
        return str(self.link(ledger, name, manifest, writer, gift=False))

    def link(self, ledger: Ledger, name: str, manifest: Manifest, writer: int, gift: bool) -> Cid:
        """Seal the local object ``name`` under ``manifest``'s CID (the caller holds the ledger
        lock); ``name`` becomes a symlink to it. If a copy is sealed already, this file is
        dropped (``gift``: given back to its writer). The writer is remembered with the link
        count: when the last name goes, so does the object, back to its writer."""
        path = self.paths.local_file(name)
        cid = self.alias(name)
        if cid is not None:
            return cid  # linked by another process between our hashing and the lock
        size = os.stat(path).st_size
        cname = str(manifest.root)
        final = self.paths.sealed(cname)
        previous = ledger.link(cname)
        if os.path.exists(final):  # a copy is sealed: keep that one, drop this file
            os.utime(final)
            if not (gift and self._give_back(ledger, path, writer)):
                os.unlink(path)
                ledger.used -= size
            born = bool(previous and previous[1])
            writer = previous[2] if previous else 0
        else:
            drop_spilled_copy(self.paths, ledger, cname)
            sealed = seal_local_in_place(path, manifest)
            # a second name first, then the local one becomes a symlink: a crash in between
            # leaves both names on one sealed file, which recovery turns into the symlink
            os.link(path, final)
            ledger.used += sealed - size
            born = previous is None or previous[1]
        self._symlink(name, cname)
        ledger.set_link(cname, (previous[0] if previous else 0) + 1, born, writer)
        ledger.move_pins(name, cname)
        self._manifests[manifest.root] = manifest
        return manifest.root

    def _symlink(self, name: str, cname: str) -> None:
        link = self.paths.temp(new_token(suffix="-link"))
        os.symlink(os.path.join("..", "objects", cname), link)
        os.replace(link, self.paths.local_file(name))

    def recover(self, default_hash_code: int) -> set[str]:
        """Finish or undo links that a crash interrupted (the caller holds the ledger lock).
        Returns the CIDs whose file a link made."""
        made = set()
        for entry in os.scandir(self.paths.local):
            if not entry.is_file(follow_symlinks=False):
                continue
            root = repair_local(entry.path, default_hash_code)
            if root is None:
                continue
            final = self.paths.sealed(str(root))
            try:
                if os.stat(final).st_ino == entry.inode():
                    made.add(str(root))  # the crash came between the two names
            except FileNotFoundError:
                os.link(entry.path, final)
                made.add(str(root))
            self._symlink(entry.name, str(root))
        return made

    def delete(
        self, ledger: Ledger, name: str, keep: Callable[[str], bool] | None = None
    ) -> tuple[str, int] | None:
        """Delete the local name (the caller holds the lock). An unresolved object goes (back
        to its writer if it takes it); a linked one loses a name: (CID, writer) when that was
        the last name of an object a link made, for the caller to delete, unless ``keep(CID)``
        (someone holds it by its CID: the object stays, as one sealed under its CID)."""
        ledger.drop_pins(name)
        try:
            linked = self.alias(name)
        except ObjectNotFound:
            return None
        path = self.paths.local_file(name)
        if linked is None:
            if not self._give_back(ledger, path, None):
                try:
                    size = os.stat(path).st_size
                    os.unlink(path)
                    ledger.used -= size
                except FileNotFoundError:
                    pass
            return None
        os.unlink(path)
        cname = str(linked)
        entry = ledger.link(cname)
        if entry is None:
            return None
        count, born, writer = entry
        if count > 1:
            ledger.set_link(cname, count - 1, born, writer)
            return None
        ledger.drop_link(cname)
        return (cname, writer) if born and not (keep is not None and keep(cname)) else None

    def hand_over(self, ledger: Ledger, cid: str) -> bool:
        """The holder of ``cid`` itself lets go (the caller holds the lock): if local names
        are still linked to it, the object now goes with the last of them (True); else False
        (nothing else names it)."""
        entry = ledger.link(cid)
        if entry is None:
            return False
        count, _born, writer = entry
        ledger.set_link(cid, count, True, writer)
        return True

    def read_value(self, name: str, read_sealed: Callable[[Cid], Any]) -> Any:
        """The value of the local name ``name``: read from its mapping while it is unresolved
        (no hashing), else by ``read_sealed`` of the CID it was linked to."""
        for _ in range(_RETRIES):
            linked = self.alias(name)
            if linked is not None:
                return read_sealed(linked)
            path = self.paths.local_file(name)
            try:
                local = read_local(path)
            except (FileNotFoundError, TornRead):
                continue  # being linked under its CID right now: the alias comes next
            try:
                os.utime(path, follow_symlinks=False)
            except FileNotFoundError:
                pass
            return deserialize(local.meta, local.payload)
        raise ObjectNotFound(name, "local object kept changing while being read")
