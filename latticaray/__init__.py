"""latticaray: a Ray-like task and actor runtime over a decentralized peer-to-peer mesh."""

__version__ = "0.1.0"

from latticaray.runtime.api import (ActorClass, ActorHandle, NodeAffinitySchedulingStrategy,
                                    RemoteFunction, available_resources, cancel,
                                    cluster_resources, get, get_actor, get_runtime_context, init,
                                    invite, is_initialized, kill, mesh_info, method, nodes, put,
                                    remote, shutdown, wait)
from latticaray.runtime.errors import (ActorDiedError, ActorNameTakenError, CredentialError,
                                       GetTimeoutError, LatticaError, NodeDiedError,
                                       NotMemberError, ObjectLostError, ObjectNotFoundError,
                                       TaskCancelledError, TaskError, TaskUnschedulableError,
                                       WorkerCrashedError)
from latticaray.runtime.refs import ObjectRef, ObjectRefGenerator

__all__ = [
    "__version__", "init", "invite", "mesh_info", "shutdown", "is_initialized", "remote",
    "method", "get", "put", "wait", "cancel", "kill", "get_actor", "nodes", "cluster_resources",
    "available_resources", "get_runtime_context", "ObjectRef", "ObjectRefGenerator",
    "ActorHandle", "ActorClass", "RemoteFunction", "NodeAffinitySchedulingStrategy",
    "LatticaError", "TaskError", "ActorDiedError", "ActorNameTakenError", "ObjectLostError",
    "ObjectNotFoundError", "GetTimeoutError", "TaskCancelledError", "NodeDiedError",
    "WorkerCrashedError", "TaskUnschedulableError", "NotMemberError", "CredentialError",
]
