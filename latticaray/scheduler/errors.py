"""Typed errors of the scheduler: unschedulable requests, over-commit, malformed capacity ads."""

from __future__ import annotations


class SchedulerError(Exception):
    """Base class of every error raised by latticaray.scheduler."""


class UnschedulableError(SchedulerError):
    """No node of the mesh can ever satisfy the request, and it stayed so until the timeout.

    ``reason`` says which hard constraint no node met (resources, labels, affinity, local-only).
    """

    def __init__(self, task_id: object, reason: str, waited_s: float | None = None) -> None:
        waited = f" after waiting {waited_s:.1f}s" if waited_s is not None else ""
        super().__init__(f"task {task_id} cannot be scheduled{waited}: {reason}")
        self.task_id = task_id
        self.reason = reason
        self.waited_s = waited_s


class ResourceError(SchedulerError, ValueError):
    """A resource request is malformed (negative amount, fractional GPU above 1, unknown id...)."""


class InsufficientResources(SchedulerError):
    """A local acquire would over-commit the node; nothing was taken."""

    def __init__(self, missing: dict[str, float]) -> None:
        parts = ", ".join(f"{k} short by {v:g}" for k, v in sorted(missing.items()))
        super().__init__(f"not enough local resources: {parts}")
        self.missing = missing


class QueueFull(SchedulerError):
    """Backpressure: a bounded placement queue is full; the caller must wait and resubmit."""


class InvalidCapacityAd(SchedulerError, ValueError):
    """A capacity advertisement is malformed, oversize, expired or badly signed."""
