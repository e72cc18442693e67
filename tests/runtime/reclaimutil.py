"""What the actor-reclamation tests (embedded node and across node processes) wait on: a file,
a worker process's exit, the state API's DEAD row with the reclamation cause. Each helper takes
its module's ``deadline``; the modules bind it with functools.partial."""

from __future__ import annotations

import gc
import os
import time

from latticaray.util.state import list_actors

RECLAIMED = "every handle to it went out of scope"


def wait_path(path, *, deadline: float) -> None:
    until = time.monotonic() + deadline
    while not os.path.exists(path):
        assert time.monotonic() < until, f"{path} never appeared"
        time.sleep(0.02)


def process_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def wait_for(predicate, what: str, *, deadline: float) -> None:
    until = time.monotonic() + deadline
    while not predicate():
        assert time.monotonic() < until, f"timed out after {deadline} s waiting for {what}"
        gc.collect()
        time.sleep(0.05)


def actor_row(actor_id: str):
    rows = [row for row in list_actors(limit=10_000) if row.actor_id == actor_id]
    return rows[0] if rows else None


def assert_reclaimed(pid: int, actor_id: str, *, deadline: float) -> None:
    wait_for(
        lambda: not process_alive(pid), "the actor's worker process to exit", deadline=deadline
    )
    wait_for(
        lambda: getattr(actor_row(actor_id), "state", None) == "DEAD",
        "its DEAD row",
        deadline=deadline,
    )
    assert RECLAIMED in (actor_row(actor_id).death_cause or "")
