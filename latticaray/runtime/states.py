"""Lifecycles of tasks and actors: their states, the events that move them, and the tables of
legal transitions (in the manner of h11's ``_state.py``).

A task (or actor call) record starts `TaskState.RESOLVING` and ends `FINISHED` or `FAILED`; an
actor starts `ActorState.PENDING` and ends `DEAD`. ``task_transition(state, event)`` and
``actor_transition(state, event)`` give the next state or raise `IllegalTransition`: the tables
are the whole truth of which moves exist, so a path the runtime takes that is not written here
is a bug that shows itself at once instead of leaving a record in a state nothing expects.

What each state means, in terms of the node (runtime/local/tasks.py, runtime/remote/caller.py):

  RESOLVING   top-level ref arguments are being resolved, or their only copies fetched here
              (lineage ``fetch_args_first``) before the task may run
  SCHEDULING  arguments ready: placement is being decided (local, a peer, or wait)
  DEFERRED    no admitted node can take it now: it waits for DHT capacity ads
  QUEUED      waits for a local worker and resources (the ready queue), or in an actor's outbox
  RUNNING     on a local worker process
  REMOTE      sent to another node over its task session; that node's `done` is awaited
  STREAMING   a streaming task that has yielded an item: it is never run again (a retry would
              repeat items its consumer saw), so a worker or node death fails it
  CANCELLING  cancel was asked while it runs (here or elsewhere): it ends failed (cancelled)
              or with what it returns, never retried or re-queued; a task cancelled before
              it runs is failed at once
  FINISHED    results sealed                                                       (terminal)
  FAILED      an error sealed in its place                                         (terminal)

`ActorState` is the actor lifecycle the cluster state (`latticaray.state.actors`, named-actor
claims) already publishes; one enum serves both. Its moves: an actor is PENDING until its worker
(or, at the owner, its host) is started with the constructor, ALIVE until that worker or host
dies, RESTARTING while it is started again (restarts left), and DEAD for good (killed,
constructor failed, no restarts left, its name lost to an earlier claim).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Final

from latticaray.state.actors import ActorState

__all__ = [
    "ACTOR_TRANSITIONS",
    "TASK_TERMINAL",
    "TASK_TRANSITIONS",
    "ActorEvent",
    "ActorState",
    "IllegalTransition",
    "TaskEvent",
    "TaskState",
    "actor_transition",
    "task_transition",
]


class TaskState(enum.Enum):
    RESOLVING = "resolving"
    SCHEDULING = "scheduling"
    DEFERRED = "deferred"
    QUEUED = "queued"
    RUNNING = "running"
    REMOTE = "remote"
    STREAMING = "streaming"
    CANCELLING = "cancelling"
    FINISHED = "finished"
    FAILED = "failed"


class TaskEvent(enum.Enum):
    ARGS_READY = "args_ready"  # every top-level ref argument is a value here
    FETCH_ARGS = "fetch_args"  # an argument's only copy is elsewhere: it comes here first
    DEFER = "defer"  # no node can take it now: wait for capacity ads
    CAPACITY = "capacity"  # a capacity ad (or a new peer) may take the deferred task
    QUEUE = "queue"  # wait for a local worker; or in an actor's outbox
    DISPATCH = "dispatch"  # handed to a local worker (task pool or actor)
    SEND = "send"  # sent to another node
    RESEND = "resend"  # sent again (`again`): the task session broke or moved
    SPILL = "spill"  # the node it was sent to was full (`rejected`): placed again
    YIELD = "yield"  # a streamed item was sealed
    RETRY = "retry"  # worker/node died or a retryable error came back, retries are left
    CANCEL = "cancel"
    COMPLETE = "complete"  # results sealed
    FAIL = "fail"  # an error sealed: unschedulable, argument failed, died, raised, cancelled


class ActorEvent(enum.Enum):
    STARTED = "started"  # its worker runs the constructor (at the owner: its host was sent it)
    RESTART = "restart"  # its worker or host died and it has restarts left
    DIED = "died"  # killed, constructor failed, unschedulable, no restarts left, name lost


_S = TaskState
_E = TaskEvent
_NOT_DONE = tuple(s for s in TaskState if s not in (_S.FINISHED, _S.FAILED))

#: (state, event) -> next state. Every pair not listed is illegal.
TASK_TRANSITIONS: Final[Mapping[tuple[TaskState, TaskEvent], TaskState]] = {
    # arguments
    (_S.RESOLVING, _E.ARGS_READY): _S.SCHEDULING,
    (_S.RESOLVING, _E.QUEUE): _S.QUEUED,  # arguments fetched here first (lineage)
    (_S.SCHEDULING, _E.FETCH_ARGS): _S.RESOLVING,
    # placement
    (_S.SCHEDULING, _E.DEFER): _S.DEFERRED,
    (_S.DEFERRED, _E.CAPACITY): _S.SCHEDULING,
    (_S.SCHEDULING, _E.QUEUE): _S.QUEUED,
    (_S.SCHEDULING, _E.SEND): _S.REMOTE,
    (_S.QUEUED, _E.SEND): _S.REMOTE,  # an actor call pumped from the owner's outbox
    # running here
    (_S.QUEUED, _E.DISPATCH): _S.RUNNING,
    (_S.RUNNING, _E.YIELD): _S.STREAMING,
    (_S.RUNNING, _E.RETRY): _S.QUEUED,
    (_S.RUNNING, _E.COMPLETE): _S.FINISHED,
    # running elsewhere
    (_S.REMOTE, _E.RESEND): _S.REMOTE,
    (_S.REMOTE, _E.YIELD): _S.STREAMING,
    (_S.REMOTE, _E.RETRY): _S.SCHEDULING,  # placed again, the dead node excluded
    (_S.REMOTE, _E.SPILL): _S.SCHEDULING,  # placed again with the rejecting node's fresh view
    (_S.REMOTE, _E.QUEUE): _S.QUEUED,  # no session after all; an actor call waits for its restart
    (_S.REMOTE, _E.COMPLETE): _S.FINISHED,
    # streaming: items went out, so it never runs again
    (_S.STREAMING, _E.YIELD): _S.STREAMING,
    (_S.STREAMING, _E.RESEND): _S.STREAMING,  # the executor re-delivers from `got` on
    (_S.STREAMING, _E.COMPLETE): _S.FINISHED,
    # cancelled while it runs: it ends, without a retry (one that has not run yet is failed
    # at once: FAIL)
    (_S.RUNNING, _E.CANCEL): _S.CANCELLING,
    (_S.REMOTE, _E.CANCEL): _S.CANCELLING,
    (_S.STREAMING, _E.CANCEL): _S.CANCELLING,
    (_S.CANCELLING, _E.CANCEL): _S.CANCELLING,
    (_S.CANCELLING, _E.YIELD): _S.CANCELLING,
    (_S.CANCELLING, _E.COMPLETE): _S.FINISHED,
    # from any state that is not final
    **{(state, _E.FAIL): _S.FAILED for state in _NOT_DONE},
}

TASK_TERMINAL: Final = frozenset({TaskState.FINISHED, TaskState.FAILED})

_A = ActorState
_AE = ActorEvent

#: (state, event) -> next state. Every pair not listed is illegal; DEAD is final.
ACTOR_TRANSITIONS: Final[Mapping[tuple[ActorState, ActorEvent], ActorState]] = {
    (_A.PENDING, _AE.STARTED): _A.ALIVE,
    (_A.PENDING, _AE.DIED): _A.DEAD,
    (_A.ALIVE, _AE.RESTART): _A.RESTARTING,
    (_A.ALIVE, _AE.DIED): _A.DEAD,
    (_A.RESTARTING, _AE.STARTED): _A.ALIVE,
    (_A.RESTARTING, _AE.DIED): _A.DEAD,
}


class IllegalTransition(RuntimeError):
    """An event that the lifecycle's table does not allow in the current state (a bug of this
    node, as h11's LocalProtocolError: the record is left as it was)."""

    def __init__(self, what: str, state: enum.Enum, event: enum.Enum) -> None:
        super().__init__(f"{what} in state {state.name} cannot take event {event.name}")
        self.state = state
        self.event = event


def task_transition(state: TaskState, event: TaskEvent) -> TaskState:
    """The state a task in ``state`` moves to on ``event``; IllegalTransition if none."""
    try:
        return TASK_TRANSITIONS[state, event]
    except KeyError:
        raise IllegalTransition("task", state, event) from None


def actor_transition(state: ActorState, event: ActorEvent) -> ActorState:
    """The state an actor in ``state`` moves to on ``event``; IllegalTransition if none."""
    try:
        return ACTOR_TRANSITIONS[state, event]
    except KeyError:
        raise IllegalTransition("actor", state, event) from None
