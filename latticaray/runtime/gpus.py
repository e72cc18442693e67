"""GPUs of a node: which devices it has, and which ones the running task or actor may use.

Node side, :func:`detect_gpus` decides the device ids a node offers (Ray's order):

1. ``CUDA_VISIBLE_DEVICES`` in the node's environment, when set, is the list of devices the
   node may use (``""`` or ``NoDevFiles``: none), as with Ray;
2. else NVML through ``nvidia-ml-py`` (module ``pynvml``), when importable and a driver answers:
   devices ``0..n-1`` with their names;
3. else none.

``--num-gpus N`` (``init(num_gpus=N)``) overrides the count: the first N of the detected ids,
or, when fewer were detected, ids ``0..N-1`` declared by hand (fake GPUs for tests and for
machines whose driver NVML cannot see; a warning names the difference).

Worker side, the node hands each task or actor the ids its allocation holds (the scheduler's
:class:`~latticaray.scheduler.resources.ResourceLedger` picks them, sharing a device between
fractional requests); :func:`apply_gpu_ids` sets ``CUDA_VISIBLE_DEVICES`` to exactly those
before the user's code runs and :func:`get_gpu_ids` returns them (``latticaray.get_gpu_ids()``,
as ``ray.get_gpu_ids()``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

__all__ = ["GpuInfo", "apply_gpu_ids", "detect_gpus", "get_gpu_ids", "parse_visible_devices"]

log = logging.getLogger(__name__)

_ENV = "CUDA_VISIBLE_DEVICES"
_current: list[str] = []


@dataclass(frozen=True)
class GpuInfo:
    """The GPU devices a node offers: ids (as CUDA_VISIBLE_DEVICES spells them) and names."""

    ids: tuple[str, ...]
    #: "env" (CUDA_VISIBLE_DEVICES), "nvml", "declared" (--num-gpus beyond detection), "none"
    source: str
    names: tuple[str, ...] = field(default=())

    @property
    def count(self) -> int:
        return len(self.ids)

    def labels(self) -> dict[str, str]:
        """Node labels describing the accelerators (``accelerator_type`` when NVML named them)."""
        if self.names:
            return {"accelerator_type": self.names[0].replace(" ", "_")[:128]}
        return {}


def parse_visible_devices(value: str | None) -> list[str] | None:
    """The ids in a ``CUDA_VISIBLE_DEVICES`` value (None: not set)."""
    if value is None:
        return None
    value = value.strip()
    if value in ("", "NoDevFiles", "-1"):
        return []
    ids = [part.strip() for part in value.split(",") if part.strip()]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{_ENV}={value!r} names a device twice")
    return ids


def _nvml_devices() -> list[str] | None:
    """Device names from NVML, or None when nvidia-ml-py is absent or no driver answers."""
    try:
        import pynvml  # type: ignore[import-not-found]  # nvidia-ml-py, optional
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # NVMLError: no driver, no device
        log.debug("NVML not available: %s", exc)
        return None
    try:
        names = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            name = pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(i))
            names.append(name.decode() if isinstance(name, bytes) else str(name))
        return names
    except Exception as exc:
        log.warning("NVML answered but listing devices failed: %s", exc)
        return None
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


def detect_gpus(num_gpus: float | None = None, env: Mapping[str, str] | None = None) -> GpuInfo:
    """The GPUs this node offers (see the module docstring for the order of sources)."""
    env = os.environ if env is None else env
    if num_gpus is not None:
        if num_gpus < 0 or num_gpus != int(num_gpus):
            raise ValueError(f"num_gpus for a node must be a whole number >= 0, got {num_gpus}")
        num_gpus = int(num_gpus)
    visible = parse_visible_devices(env.get(_ENV))
    names: list[str] = []
    if visible is not None:
        ids, source = visible, "env"
    else:
        found = _nvml_devices()
        if found:
            ids, source, names = [str(i) for i in range(len(found))], "nvml", found
        else:
            ids, source = [], "none"
    if num_gpus is not None:
        if num_gpus <= len(ids):
            ids, names = ids[:num_gpus], names[:num_gpus]
        else:
            if ids or source != "none":
                log.warning(
                    "num_gpus=%d but %d GPU(s) detected (%s): declaring ids beyond them",
                    num_gpus,
                    len(ids),
                    source,
                )
            taken = set(ids)
            extra = [str(i) for i in range(num_gpus * 2 + len(ids)) if str(i) not in taken]
            ids = ids + extra[: num_gpus - len(ids)]
            source = "declared"
    return GpuInfo(tuple(ids), source if ids else "none", tuple(names))


def apply_gpu_ids(ids: Sequence[str], environ: dict[str, str] | None = None) -> None:
    """In a worker, before a task or actor runs: it sees exactly ``ids`` (none: no GPU)."""
    global _current
    target = os.environ if environ is None else environ
    _current = [str(i) for i in ids]
    target[_ENV] = ",".join(_current)


def get_gpu_ids() -> list[str]:
    """The GPU ids the running task or actor was given (empty outside one, or without GPUs)."""
    return list(_current)
