"""The ``revocations`` collection: who (or which credential) is no member of the mesh any more.

Each entry is keyed by its subject (``peer:<peer id>`` or ``cred:<credential id, hex>``) and holds
the revocation's text, a statement signed by the mesh key (latticaray.runtime.admission). Any
member may write or forward one: what makes it count is the mesh key's signature inside, which
every replica checks (the ``verify`` function it is given) before merging, so a member cannot
revoke anyone by itself, nor forge or alter a revocation. Entries are never removed: a tombstone,
or a value that is not a revocation of its key's subject, is refused.
"""

from __future__ import annotations

from collections.abc import Callable

from .atoms import Atom
from .store import Change, CollectionSpec

__all__ = ["REVOCATIONS", "RevocationCheck", "Revocations"]

REVOCATIONS = "revocations"
MAX_REVOCATION_TEXT = 2048
#: ``verify(subject, text)``: None if ``text`` is a valid revocation of ``subject``, else why not.
RevocationCheck = Callable[[str, str], "str | None"]


class Revocations:
    """View of the ``revocations`` collection: ``add``, ``all``, ``on_revoked``."""

    def __init__(self, replica, verify: RevocationCheck) -> None:
        self._replica = replica
        self._verify = verify
        self._callbacks: list[Callable[[str, str], None]] = []
        replica.store.define(CollectionSpec(REVOCATIONS, self._rule))
        replica.store.watch(REVOCATIONS, self._on_changes)

    def _rule(self, atom: Atom) -> str | None:
        if atom.tombstone:
            return "a revocation is never withdrawn"
        if atom.subkey != "":
            return "revocations have no subkeys"
        try:
            text = atom.decoded_value()
        except Exception as exc:
            return f"undecodable revocation: {exc}"
        if not isinstance(text, str) or len(text) > MAX_REVOCATION_TEXT:
            return "a revocation is a string of at most 2048 characters"
        return self._verify(atom.key, text)

    def add(self, subject: str, text: str) -> Atom:
        """Publish a revocation (checked here as every replica checks it)."""
        reason = self._verify(subject, text)
        if reason is not None:
            raise ValueError(f"not a revocation of {subject}: {reason}")
        return self._replica.write(REVOCATIONS, subject, "", text)

    def get(self, subject: str) -> str | None:
        atom = self._replica.store.get((REVOCATIONS, subject, ""))
        return None if atom is None or atom.tombstone else atom.decoded_value()

    def all(self) -> dict[str, str]:
        """Subject -> revocation text, for every revocation this replica holds."""
        out = {}
        for subject in self._replica.store.keys(REVOCATIONS):
            text = self.get(subject)
            if text is not None:
                out[subject] = text
        return out

    def on_revoked(self, callback: Callable[[str, str], None]) -> None:
        """Call ``callback(subject, text)`` for every revocation merged or written from now on."""
        self._callbacks.append(callback)

    def _on_changes(self, changes: list[Change]) -> None:
        for change in changes:
            new = change.new
            if new is None or new.tombstone:
                continue
            if change.old is not None and not change.old.tombstone:
                continue  # the subject was revoked already
            text = new.decoded_value()
            for callback in list(self._callbacks):
                callback(new.key, text)
