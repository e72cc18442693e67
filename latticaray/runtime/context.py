"""Process-wide pointer to the active core client (driver or worker) and the runtime context."""

from __future__ import annotations

import contextvars
from dataclasses import dataclass

_core = None

current_task_id: contextvars.ContextVar[bytes | None] = contextvars.ContextVar(
    "latticaray_task_id", default=None
)
current_actor_id: contextvars.ContextVar[bytes | None] = contextvars.ContextVar(
    "latticaray_actor_id", default=None
)
#: the placement group the running task or actor was placed in: [group id, bundle index,
#: capture child tasks]
current_placement_group: contextvars.ContextVar[list | None] = contextvars.ContextVar(
    "latticaray_placement_group", default=None
)


def current_core():
    return _core


def set_core(core) -> None:
    global _core
    _core = core


def require_core():
    if _core is None:
        raise RuntimeError("latticaray is not initialized: call latticaray.init() first")
    return _core


@dataclass(frozen=True)
class RuntimeContext:
    """What `get_runtime_context()` returns: where and as what the caller runs."""

    node_id: str
    job_id: str
    task_id: str | None
    actor_id: str | None
    worker_id: str
    namespace: str

    def get_node_id(self) -> str:
        return self.node_id

    def get_task_id(self) -> str | None:
        return self.task_id

    def get_actor_id(self) -> str | None:
        return self.actor_id

    def get_job_id(self) -> str:
        return self.job_id
