"""Garbage-collector policy for long-running node processes (`latticaray start`).

CPython's cyclic collector walks every tracked container in the generation it collects; a full
(generation 2) collection in a process holding thousands of QUIC connections walks ~1M objects
and stops the event loop for up to a second. The policy:

* ``apply_startup_policy``: after start-up, collect once and ``gc.freeze()`` everything alive
  (modules, classes, the node's own long-lived state) into the permanent generation, which no
  collection walks; then raise the thresholds so young collections run less often and full
  collections are rarer.
* ``refreeze_loop`` (optional): every ``interval`` seconds collect the young generations and
  freeze again, so long-lived connection state stops being walked by full collections. The cost:
  a reference cycle that was frozen and later becomes garbage is never collected (objects freed
  by reference counting are still freed), so this is a bounded-leak trade for pause time.

Only node processes apply it: the embedded node of ``init()`` shares its process with user code,
whose objects and GC expectations the runtime must not change.
"""
from __future__ import annotations

import asyncio
import gc
from dataclasses import dataclass

# gen0 700 -> 10,000 allocations between young collections; a full collection only after 20
# gen1 collections (CPython still adds its own "25% new long-lived objects" rule on top).
DEFAULT_THRESHOLDS = (10_000, 10, 20)


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
    return GcPolicyReport(frozen=gc.get_freeze_count(), thresholds=tuple(gc.get_threshold()))


def refreeze() -> int:
    """Collect the young generations, then freeze what survives; returns the permanent count."""
    gc.collect(1)
    gc.freeze()
    return gc.get_freeze_count()


async def refreeze_loop(interval: float) -> None:
    """Run ``refreeze`` every ``interval`` seconds until cancelled."""
    while True:
        await asyncio.sleep(interval)
        refreeze()
