"""Resource model and local resource accounting for one node.

Resources are named quantities: ``CPU``, ``GPU``, ``memory`` (bytes), ``object_store_memory``
(bytes) and any custom name (``"TPU"``, ``"license:matlab"``...). Amounts are non-negative and may
be fractional; they are kept internally in fixed-point units of 1/10,000 (as Ray does) so repeated
acquire/release never drifts.

:class:`ResourceLedger` is the node-local account: tasks and actors ``acquire`` before they run and
``release`` when they finish; everything held by a worker that dies is reclaimed with
``release_owner``. It never over-commits. GPUs are tracked per device: a whole-number GPU request
gets that many devices exclusively, a fractional one (< 1) shares one device with other fractional
holders (best fit, so whole devices stay free for whole requests). An :class:`Allocation` renders
its devices as a ``CUDA_VISIBLE_DEVICES`` string.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from .errors import InsufficientResources, ResourceError

__all__ = [
    "CPU",
    "GPU",
    "GRANULARITY",
    "MEMORY",
    "OBJECT_STORE_MEMORY",
    "Allocation",
    "Normalized",
    "ResourceLedger",
    "fits",
    "normalize",
    "shortfall",
]

CPU = "CPU"
GPU = "GPU"
MEMORY = "memory"
OBJECT_STORE_MEMORY = "object_store_memory"

#: Fixed-point units per whole resource (1/10,000 granularity).
GRANULARITY = 10_000
_MAX_NAME_LEN = 128
_EPS = 0.5 / GRANULARITY


def _units(amount: float) -> int:
    return round(amount * GRANULARITY)


class Normalized(dict):
    """A resource map that already went through :func:`normalize` (so it is not re-checked)."""


def normalize(resources: Mapping[str, float] | None) -> dict[str, float]:
    """Validate a resource request or capacity and return it without zero entries.

    Raises :class:`ResourceError` for non-string or oversize names, non-finite or negative amounts,
    and GPU amounts above 1 that are not whole numbers (``num_gpus=1.5`` is refused, as in Ray).
    """
    if isinstance(resources, Normalized):
        return resources
    out: dict[str, float] = Normalized()
    for name, amount in (resources or {}).items():
        if not isinstance(name, str) or not name or len(name) > _MAX_NAME_LEN:
            raise ResourceError(
                f"resource name must be a non-empty string of at most "
                f"{_MAX_NAME_LEN} characters, got {name!r}"
            )
        if isinstance(amount, bool) or not isinstance(amount, (int, float)):
            raise ResourceError(f"resource {name!r}: amount must be a number, got {amount!r}")
        amount = float(amount)
        if not math.isfinite(amount) or amount < 0:
            raise ResourceError(f"resource {name!r}: amount must be finite and >= 0, got {amount}")
        if name == GPU and amount > 1 and _units(amount) % GRANULARITY:
            raise ResourceError(f"GPU amounts above 1 must be whole numbers, got {amount}")
        if _units(amount) > 0:
            out[name] = _units(amount) / GRANULARITY
    return out


def fits(available: Mapping[str, float], demand: Mapping[str, float]) -> bool:
    """True when every demanded amount is available (within fixed-point granularity)."""
    for name, amount in demand.items():
        if available.get(name, 0.0) + _EPS < amount:
            return False
    return True


def shortfall(available: Mapping[str, float], demand: Mapping[str, float]) -> dict[str, float]:
    """How much of each demanded resource is missing from ``available`` (empty when it fits)."""
    return {
        name: round(amount - available.get(name, 0.0), 4)
        for name, amount in demand.items()
        if available.get(name, 0.0) + _EPS < amount
    }


@dataclass(frozen=True)
class Allocation:
    """Resources held by one task or actor on this node."""

    allocation_id: str
    owner: str | None
    resources: dict[str, float]
    #: (device id, share in fixed-point units) for each GPU device used.
    gpu_shares: tuple[tuple[str, int], ...] = ()

    @property
    def gpu_ids(self) -> list[str]:
        return [device for device, _ in self.gpu_shares]

    @property
    def cuda_visible_devices(self) -> str:
        """Value for the worker's ``CUDA_VISIBLE_DEVICES`` ("" when it holds no GPU)."""
        return ",".join(self.gpu_ids)


@dataclass
class _Device:
    device_id: str
    free_units: int = GRANULARITY
    holders: set[str] = field(default_factory=set)
    #: What this ledger may use of the device (a bundle's ledger may hold a fraction of one).
    capacity: int = GRANULARITY


class ResourceLedger:
    """Never-over-committed account of one node's resources.

    ``total`` is the node's capacity; ``gpu_ids`` the device ids backing its ``GPU`` amount (by
    default ``"0".."n-1"``). When both are given, ``total["GPU"]`` must equal ``len(gpu_ids)``.
    """

    def __init__(
        self,
        total: Mapping[str, float],
        gpu_ids: Sequence[str | int] | None = None,
        *,
        gpu_shares: Sequence[tuple[str, int]] | None = None,
    ) -> None:
        total_n = normalize(total)
        if gpu_shares is not None:
            # A placement-group bundle's ledger: the devices (or device fractions) its
            # reservation took from the node's ledger.
            self._init_units(total_n, [_Device(d, u, set(), u) for d, u in gpu_shares])
            return
        if gpu_ids is None:
            gpus = total_n.get(GPU, 0.0)
            if gpus != int(gpus):
                raise ResourceError(f"a node's GPU capacity must be whole devices, got {gpus}")
            gpu_ids = [str(i) for i in range(int(gpus))]
        ids = [str(g) for g in gpu_ids]
        if len(set(ids)) != len(ids):
            raise ResourceError(f"duplicate GPU device ids: {ids}")
        if GPU in total_n and total_n[GPU] != len(ids):
            raise ResourceError(f"GPU capacity {total_n[GPU]} does not match {len(ids)} device ids")
        if ids:
            total_n[GPU] = float(len(ids))
        self._init_units(total_n, [_Device(d) for d in ids])

    def _init_units(self, total_n: Mapping[str, float], devices: list[_Device]) -> None:
        self._total_units = {k: _units(v) for k, v in total_n.items()}
        self._free_units = dict(self._total_units)
        self._devices = devices
        self._allocations: dict[str, Allocation] = {}
        self._by_owner: dict[str, set[str]] = {}

    @classmethod
    def for_allocation(cls, allocation: Allocation) -> ResourceLedger:
        """A ledger over exactly what ``allocation`` holds (a placement-group bundle): tasks of
        the bundle acquire from it, and get GPU ids among the bundle's devices."""
        return cls(allocation.resources, gpu_shares=allocation.gpu_shares)

    # views ------------------------------------------------------------------------------------
    @property
    def total(self) -> dict[str, float]:
        return {k: v / GRANULARITY for k, v in self._total_units.items()}

    @property
    def available(self) -> dict[str, float]:
        return {k: v / GRANULARITY for k, v in self._free_units.items()}

    @property
    def gpu_ids(self) -> list[str]:
        return [d.device_id for d in self._devices]

    def allocations(self) -> list[Allocation]:
        return list(self._allocations.values())

    def allocation(self, allocation_id: str) -> Allocation | None:
        return self._allocations.get(allocation_id)

    def __len__(self) -> int:
        return len(self._allocations)

    # checks -----------------------------------------------------------------------------------
    def could_ever_fit(self, demand: Mapping[str, float], *, normalized: bool = False) -> bool:
        """True when the request fits the node's total capacity (an idle node could run it).

        ``normalized=True`` skips validation for a demand that already went through
        :func:`normalize` (as every ``PlacementRequest.resources`` has)."""
        if not normalized:
            demand = normalize(demand)
        total = self._total_units
        for k, v in demand.items():
            if total.get(k, 0) < round(v * GRANULARITY):  # _units, inlined: a hot path
                return False
        return True

    def missing(self, demand: Mapping[str, float], *, normalized: bool = False) -> dict[str, float]:
        """What is short right now for ``demand`` (empty when :meth:`acquire` would succeed)."""
        if not normalized:
            demand = normalize(demand)
        free = self._free_units
        short: dict[str, float] = {}
        for k, v in demand.items():
            need = round(v * GRANULARITY)  # _units, inlined: the admission hot path
            have = free.get(k, 0)
            if have < need:
                short[k] = (need - have) / GRANULARITY
        if not short and demand.get(GPU) and self._pick_devices(_units(demand[GPU])) is None:
            short[GPU] = demand[GPU]  # enough GPU in aggregate, but fragmented across devices
        return short

    def can_fit(self, demand: Mapping[str, float], *, normalized: bool = False) -> bool:
        if not normalized:
            demand = normalize(demand)
        free = self._free_units
        for k, v in demand.items():
            if free.get(k, 0) < round(v * GRANULARITY):
                return False
        return not (demand.get(GPU) and self._pick_devices(_units(demand[GPU])) is None)

    # acquire / release ------------------------------------------------------------------------
    def acquire(
        self,
        allocation_id: str,
        demand: Mapping[str, float],
        owner: str | None = None,
        *,
        fits: bool = False,
    ) -> Allocation:
        """Take ``demand`` for ``allocation_id`` or raise :class:`InsufficientResources`.
        ``fits=True``: the caller has just checked :meth:`can_fit` for this normalized demand
        (the admission path), so it is not checked twice."""
        if allocation_id in self._allocations:
            raise ResourceError(f"allocation {allocation_id!r} already holds resources")
        demand = normalize(demand)
        if not fits:
            short = self.missing(demand)
            if short:
                raise InsufficientResources(short)
        shares: tuple[tuple[str, int], ...] = ()
        if demand.get(GPU):
            need = _units(demand[GPU])
            picked = self._pick_devices(need)
            assert picked is not None  # missing() checked it
            shares = tuple((d.device_id, min(need, GRANULARITY)) for d in picked)
            for device in picked:
                device.free_units -= min(need, GRANULARITY)
                device.holders.add(allocation_id)
        for k, v in demand.items():
            self._free_units[k] -= _units(v)
        alloc = Allocation(allocation_id, owner, demand, shares)
        self._allocations[allocation_id] = alloc
        if owner is not None:
            self._by_owner.setdefault(owner, set()).add(allocation_id)
        return alloc

    def set_owner(self, allocation_id: str, owner: str) -> Allocation:
        """Bind an allocation to the worker that runs it (so its death reclaims it)."""
        alloc = self._allocations.get(allocation_id)
        if alloc is None:
            raise ResourceError(f"no allocation {allocation_id!r}")
        if alloc.owner is not None:
            owned = self._by_owner.get(alloc.owner, set())
            owned.discard(allocation_id)
            if not owned:
                self._by_owner.pop(alloc.owner, None)
        alloc = Allocation(alloc.allocation_id, owner, alloc.resources, alloc.gpu_shares)
        self._allocations[allocation_id] = alloc
        self._by_owner.setdefault(owner, set()).add(allocation_id)
        return alloc

    def release(self, allocation_id: str) -> Allocation | None:
        """Give back what ``allocation_id`` holds. Idempotent: unknown ids return None."""
        alloc = self._allocations.pop(allocation_id, None)
        if alloc is None:
            return None
        for k, v in alloc.resources.items():
            self._free_units[k] = min(self._total_units[k], self._free_units[k] + _units(v))
        devices = {d.device_id: d for d in self._devices}
        for device_id, share in alloc.gpu_shares:
            device = devices[device_id]
            device.free_units = min(device.capacity, device.free_units + share)
            device.holders.discard(allocation_id)
        if alloc.owner is not None:
            owned = self._by_owner.get(alloc.owner)
            if owned is not None:
                owned.discard(allocation_id)
                if not owned:
                    del self._by_owner[alloc.owner]
        return alloc

    def release_owner(self, owner: str) -> list[Allocation]:
        """Reclaim everything held by ``owner`` (a worker that died)."""
        return [a for a in (self.release(i) for i in sorted(self._by_owner.get(owner, ()))) if a]

    # GPU device choice ------------------------------------------------------------------------
    def _pick_devices(self, need_units: int) -> list[_Device] | None:
        if need_units <= 0:
            return []
        if need_units < GRANULARITY:
            # Fractional: best fit among devices with room, so whole devices stay whole.
            candidates = [d for d in self._devices if d.free_units >= need_units]
            if not candidates:
                return None
            return [min(candidates, key=lambda d: (d.free_units, d.device_id))]
        count = need_units // GRANULARITY
        whole = [d for d in self._devices if d.free_units == GRANULARITY == d.capacity]
        if len(whole) < count:
            return None
        return whole[:count]


def total_of(resources: Iterable[Mapping[str, float]]) -> dict[str, float]:
    """Sum several resource maps (used for aggregate cluster capacity)."""
    out: dict[str, int] = {}
    for r in resources:
        for k, v in r.items():
            out[k] = out.get(k, 0) + _units(v)
    return {k: v / GRANULARITY for k, v in out.items()}
