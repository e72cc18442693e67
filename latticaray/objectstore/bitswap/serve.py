"""Serving ``/latticaray/bitswap/1``: what a holder answers to one request. Sans-I/O.

:func:`plan_response` turns a decoded :class:`~.messages.Request` and what we hold of its root (the
manifest, and for a partial holder which blocks it has and which it has asked for) into a
:class:`ServePlan`: presences first, then the blocks to send in priority order. The exchange's
service reads the planned blocks from the store and streams them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..cid import Cid
from ..manifest import Manifest
from .messages import DONT_HAVE, HAVE, PENDING, WANT_BLOCK, WANT_HAVE, Request, bitmap_from_flags

__all__ = ["ServePlan", "plan_response"]


@dataclass
class ServePlan:
    """What to answer to one request: presences first, then blocks in priority order.

    ``blocks`` holds ``(cid, index)``; index ``-1`` is the manifest (root) block itself.
    """

    presences: list[tuple[Cid, int, bytes | None]] = field(default_factory=list)
    blocks: list[tuple[Cid, int]] = field(default_factory=list)


def plan_response(
    request: Request,
    manifest: Manifest | None,
    have_flags: bytes | None,
    pending_flags: bytes | None = None,
) -> ServePlan:
    """Decide the answer to ``request`` for a holder of ``manifest``.

    ``manifest`` is None when we know nothing of the request's root; ``have_flags`` is None when
    we hold the whole object, else one byte per block (non-zero = held) for a partial holder.
    """
    plan = ServePlan()
    root = request.root
    cancelled = set(request.cancels)
    planned: set[Cid] = set()
    wants = sorted(request.wants, key=lambda w: -w.priority)
    if (
        have_flags is not None
        and manifest is not None
        and root == manifest.root
        and any(w.kind == WANT_BLOCK and w.cid not in cancelled for w in request.wants)
        and not any(w.cid == root and w.kind == WANT_HAVE for w in request.wants)
    ):
        # a partial holder's blocks change while it fetches: a block request (the manifest's too)
        # also gets its current have-bitmap, so the fetcher neither takes it for a full holder nor
        # keeps a stale view of it between want-haves
        plan.presences.append((root, HAVE, bitmap_from_flags(have_flags)))
        if request.pending and pending_flags is not None:
            plan.presences.append((root, PENDING, bitmap_from_flags(pending_flags)))
    for want in wants:
        if want.cid in cancelled:
            continue
        if manifest is None or root is None or manifest.root != root:
            if want.send_dont_have:
                plan.presences.append((want.cid, DONT_HAVE, None))
            continue
        if want.cid == root:
            if want.kind == WANT_HAVE:
                bitmap = None if have_flags is None else bitmap_from_flags(have_flags)
                plan.presences.append((root, HAVE, bitmap))
                if bitmap is not None and request.pending and pending_flags is not None:
                    plan.presences.append((root, PENDING, bitmap_from_flags(pending_flags)))
            else:
                plan.blocks.append((root, -1))
            continue
        places = manifest.indexes_of(want.cid)
        if have_flags is not None:
            places = tuple(i for i in places if have_flags[i])
        held = bool(places)
        if held and want.kind != WANT_HAVE:
            if want.cid in planned:
                continue  # one copy answers every place of a repeated block
            planned.add(want.cid)
        if not held:
            if want.send_dont_have:
                plan.presences.append((want.cid, DONT_HAVE, None))
        elif want.kind == WANT_HAVE:
            plan.presences.append((want.cid, HAVE, None))
        else:
            plan.blocks.append((want.cid, places[0]))
    return plan
