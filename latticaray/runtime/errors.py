"""Typed exceptions raised to users of the runtime (the Ray error family, renamed)."""

from __future__ import annotations

import pickle


class LatticaError(Exception):
    """Base class of every error the runtime raises to users."""


class TaskError(LatticaError):
    """A task or actor method raised: carries the remote exception type and traceback.

    `get` re-raises it as an instance of both TaskError and the remote exception's class where
    that class can be subclassed, so `except ValueError` catches a remote ValueError.
    """

    def __init__(
        self,
        function_name: str,
        cause_type: str,
        remote_traceback: str,
        cause: BaseException | None = None,
        node_id: str = "",
    ):
        self.function_name = function_name
        self.cause_type = cause_type
        self.remote_traceback = remote_traceback
        self.cause = cause
        self.node_id = node_id
        super().__init__(self._message())

    def _message(self) -> str:
        where = f" on node {self.node_id[:16]}" if self.node_id else ""
        return (
            f"task {self.function_name}{where} raised {self.cause_type}\n"
            f"--- remote traceback ---\n{self.remote_traceback.rstrip()}"
        )

    def __str__(self) -> str:
        return self._message()

    def __reduce__(self):
        cause_blob = None
        if self.cause is not None:
            try:
                import cloudpickle

                cause_blob = cloudpickle.dumps(self.cause)
            except Exception:
                cause_blob = None
        return (
            _rebuild_task_error,
            (self.function_name, self.cause_type, self.remote_traceback, cause_blob, self.node_id),
        )

    def as_instanceof_cause(self) -> TaskError:
        """This error as an instance of a class deriving from both TaskError and the cause's class."""
        cause_cls = type(self.cause) if self.cause is not None else None
        if cause_cls is None or isinstance(self, cause_cls) or issubclass(cause_cls, TaskError):
            return self
        try:
            dual = _dual_class(cause_cls)
            err = dual.__new__(dual)  # type: ignore[call-overload]
            err.function_name = self.function_name
            err.cause_type = self.cause_type
            err.remote_traceback = self.remote_traceback
            err.cause = self.cause
            err.node_id = self.node_id
            err.args = (self._message(),)
            return err
        except Exception:
            return self


_dual_classes: dict[type, type] = {}


def _dual_class(cause_cls: type) -> type:
    cls = _dual_classes.get(cause_cls)
    if cls is None:
        cls = type(
            f"TaskError({cause_cls.__name__})",
            (TaskError, cause_cls),
            {
                "__init__": lambda self, *a, **k: None,
                "__str__": TaskError.__str__,
                "__reduce__": TaskError.__reduce__,
            },
        )
        cls.__module__ = __name__
        _dual_classes[cause_cls] = cls
    return cls


def _rebuild_task_error(function_name, cause_type, remote_traceback, cause_blob, node_id):
    cause = None
    if cause_blob is not None:
        try:
            cause = pickle.loads(cause_blob)
        except Exception:
            cause = None
    return TaskError(function_name, cause_type, remote_traceback, cause, node_id)


class ActorDiedError(LatticaError):
    """The actor is dead (killed, constructor failed, or out of restarts) and cannot run the call."""


class ObjectLostError(LatticaError):
    """Every copy of an object is gone and it cannot be re-created from lineage.

    `object_id` (hex), `cid` and `reason` say which object and why, where the runtime knows.
    """

    def __init__(
        self,
        message: str = "",
        *,
        object_id: str | None = None,
        cid: str | None = None,
        reason: str | None = None,
    ):
        super().__init__(message)
        self.object_id = object_id
        self.cid = cid
        self.reason = reason

    def __reduce__(self):
        return _rebuild_lost, (type(self), str(self), self.object_id, self.cid, self.reason)


def _rebuild_lost(cls, message, object_id, cid, reason):
    return cls(message, object_id=object_id, cid=cid, reason=reason)


class ObjectNotFoundError(ObjectLostError):
    """No peer of the mesh holds an object with this CID."""


class GetTimeoutError(LatticaError, TimeoutError):
    """`get` or `cid` did not finish within its timeout."""


class TaskCancelledError(LatticaError):
    """The task was cancelled before it produced its result."""


class NodeDiedError(LatticaError):
    """The node running the task died and no retries are left."""


class WorkerCrashedError(LatticaError):
    """The worker process running the task died and no retries are left."""


class ActorNameTakenError(LatticaError, ValueError):
    """An actor with this name already exists in the namespace."""


class NotMemberError(LatticaError, PermissionError):
    """The caller holds no valid membership credential for this mesh."""


class MeshUnreachableError(LatticaError, ConnectionError):
    """No bootstrap peer could be joined; the message names each address tried and why."""


class CredentialError(LatticaError, ValueError):
    """A membership credential is malformed, expired, revoked, or not signed by the mesh key."""


class NotPermittedError(LatticaError, PermissionError):
    """This node's credential role does not allow the operation (an observer submitting work)."""


from latticaray.scheduler.errors import UnschedulableError  # noqa: E402


class TaskUnschedulableError(UnschedulableError, LatticaError):
    """No node of the mesh can ever satisfy the request (the scheduler's error, picklable)."""

    def __reduce__(self):
        return (type(self), (self.task_id, self.reason, self.waited_s))
