"""Garbage-collector policy for long-running node processes (`latticaray start`).

CPython's cyclic collector walks every tracked container in the generation it collects; a full
(generation 2) collection in a process holding thousands of QUIC connections walks ~1M objects
and stops the event loop for up to a second. The policy:

* ``apply_startup_policy``: after start-up, collect once and ``gc.freeze()`` everything alive
  (modules, classes, the node's own long-lived state) into the permanent generation, which no
  collection walks; then raise the last threshold so full collections are rarer. Connection
  state made after start-up is still walked: a full collection, when it comes, is as long.
* ``refreeze_loop`` (optional): every ``interval`` seconds collect the young generations and
  freeze again, so long-lived connection state stops being walked by full collections. A
  reference cycle that was frozen and later becomes garbage (a closed connection's state) is
  not collected until the loop's periodic full collection (``full_every`` refreezes: unfreeze,
  collect everything, freeze again), so the leak is bounded by that period and the one long
  pause happens at a known rate instead of whenever the heap grew by a quarter.

Only node processes apply it: the embedded node of ``init()`` shares its process with user code,
whose objects and GC expectations the runtime must not change.
"""

from __future__ import annotations

import asyncio
import gc
from dataclasses import dataclass

# Young generations as CPython has them (a larger gen0 made gen1 collections take 0.2-0.3 s in
# bench/gc_pauses.py); a full collection after 100 gen1 collections instead of 10 (CPython still
# adds its own "long-lived objects grew by 25%" condition on top).
DEFAULT_THRESHOLDS = (700, 10, 100)


@dataclass
class GcPolicyReport:
    """What ``apply_startup_policy`` did: for the ready line and for tests."""

    frozen: int
    thresholds: tuple[int, int, int]

    def as_dict(self) -> dict:
        return {"frozen": self.frozen, "thresholds": list(self.thresholds)}


def apply_startup_policy(thresholds: tuple[int, int, int] = DEFAULT_THRESHOLDS) -> GcPolicyReport:
    """Collect, freeze everything alive into the permanent generation, raise the thresholds."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*thresholds)
    return GcPolicyReport(frozen=gc.get_freeze_count(), thresholds=gc.get_threshold())


def refreeze() -> int:
    """Collect the young generations, then freeze what survives; returns the permanent count."""
    gc.collect(1)
    gc.freeze()
    return gc.get_freeze_count()


def full_collect_and_refreeze() -> int:
    """Unfreeze, collect every generation (frozen garbage included), freeze again."""
    gc.unfreeze()
    found = gc.collect()
    gc.freeze()
    return found


async def refreeze_loop(interval: float, full_every: int = 30) -> None:
    """Run ``refreeze`` every ``interval`` seconds, and instead every ``full_every``-th time
    ``full_collect_and_refreeze``, until cancelled."""
    rounds = 0
    while True:
        await asyncio.sleep(interval)
        rounds += 1
        if full_every and rounds % full_every == 0:
            full_collect_and_refreeze()
        else:
            refreeze()
