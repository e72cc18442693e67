"""The ``jobs`` collection: job ID -> driver peer, status, start and end times.

A job's entry is written only by its driver, in the driver's own slot
``(jobs, job_id, <driver peer ID>)``. Should two drivers ever use the same job ID, every replica
picks the same one: the earliest ``(start, driver peer ID)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from ..mesh.identity import PeerId
from .atoms import Atom
from .schema import TOMBSTONE, check_fields, check_labels, check_number, own_entry_value
from .store import Change, CollectionSpec

__all__ = ["JOBS", "JobRecord", "JobStatus", "Jobs"]

JOBS = "jobs"


class JobStatus(str, Enum):
    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    STOPPED = "stopped"


@dataclass(frozen=True)
class JobRecord:
    job_id: str
    driver: PeerId
    status: JobStatus
    start: float
    end: float | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_atom(cls, atom: Atom) -> JobRecord:
        value = atom.decoded_value()
        return cls(
            atom.key,
            atom.author,
            JobStatus(value["status"]),
            float(value["start"]),
            None if value["end"] is None else float(value["end"]),
            dict(value["metadata"]),
        )


def jobs_rule(atom: Atom) -> str | None:
    problem, value = own_entry_value(
        atom, atom.subkey == str(atom.author), "only a job's driver may write its entry"
    )
    if problem or value is TOMBSTONE:
        return problem
    problem = (
        check_fields(value, {"status", "start", "end", "metadata"})
        or check_number(value["start"], "start")
        or check_number(value["end"], "end", allow_none=True)
        or check_labels(value["metadata"], "metadata")
    )
    if problem:
        return problem
    if value["status"] not in {s.value for s in JobStatus}:
        return f"unknown job status {value['status']!r}"
    return None


class Jobs:
    """Typed accessors for ``jobs``."""

    def __init__(self, replica: Any) -> None:
        self._replica = replica
        replica.store.define(CollectionSpec(JOBS, jobs_rule))

    def _own(self, job_id: str) -> JobRecord | None:
        atom = self._replica.store.get((JOBS, job_id, str(self._replica.peer_id)))
        return None if atom is None or atom.tombstone else JobRecord.from_atom(atom)

    def submit(
        self,
        job_id: str,
        status: JobStatus | str = JobStatus.RUNNING,
        start: float | None = None,
        metadata: dict[str, str] | None = None,
    ) -> Atom:
        """Record a job driven by this node."""
        value = {
            "status": JobStatus(status).value,
            "start": self._replica.wall_clock() if start is None else start,
            "end": None,
            "metadata": dict(metadata or {}),
        }
        return self._replica.write(JOBS, job_id, str(self._replica.peer_id), value)

    def update(self, job_id: str, status: JobStatus | str, end: float | None = None) -> Atom:
        """Change the status of a job this node drives; terminal statuses get an end time."""
        own = self._own(job_id)
        if own is None:
            raise KeyError(f"this node drives no job {job_id!r}")
        status = JobStatus(status)
        if end is None and status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            end = self._replica.wall_clock()
        value = {
            "status": status.value,
            "start": own.start,
            "end": end,
            "metadata": dict(own.metadata),
        }
        return self._replica.write(JOBS, job_id, str(self._replica.peer_id), value)

    def get(self, job_id: str) -> JobRecord | None:
        slots = self._replica.store.key_slots(JOBS, job_id)
        records = [JobRecord.from_atom(a) for a in slots.values() if not a.tombstone]
        return min(records, key=lambda r: (r.start, r.driver.to_bytes()), default=None)

    def all(self) -> list[JobRecord]:
        out = []
        for job_id in self._replica.store.keys(JOBS):
            record = self.get(job_id)
            if record is not None:
                out.append(record)
        return out

    def by_driver(self, driver: PeerId) -> list[JobRecord]:
        return [j for j in self.all() if j.driver == driver]

    def watch(self, callback: Callable[[str, JobRecord | None], None]) -> Callable[[], None]:
        def on_changes(changes: list[Change]) -> None:
            for job_id in dict.fromkeys(c.slot[1] for c in changes):
                callback(job_id, self.get(job_id))

        return self._replica.store.watch(JOBS, on_changes)
