"""Task and actor lifecycles (runtime/states.py): every legal move, the illegal ones refused, and
random event sequences that keep the lifecycles' promises (no retry after a stream started or a
cancel, nothing after the end, every state reachable and every state able to end)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from latticaray.runtime.states import (
    ACTOR_TRANSITIONS,
    TASK_TERMINAL,
    TASK_TRANSITIONS,
    ActorEvent,
    ActorState,
    IllegalTransition,
    TaskEvent,
    TaskState,
    actor_transition,
    task_transition,
)
from latticaray.state import actors as crdt_actors

S, E = TaskState, TaskEvent

#: The task moves the runtime makes today, each with where it happens (runtime/node.py,
#: runtime/cluster.py, runtime/lineage.py), written out independently of the table.
TASK_MOVES = {
    (S.RESOLVING, E.ARGS_READY): S.SCHEDULING,  # _resolve_args -> _schedule
    (S.RESOLVING, E.QUEUE): S.QUEUED,  # Recovery._fetch_args -> ready_queue
    (S.SCHEDULING, E.FETCH_ARGS): S.RESOLVING,  # _schedule: recovery.fetch_args_first
    (S.SCHEDULING, E.DEFER): S.DEFERRED,  # place_task -> DEFERRED
    (S.DEFERRED, E.CAPACITY): S.SCHEDULING,  # DhtPlacement retry -> _schedule
    (S.SCHEDULING, E.QUEUE): S.QUEUED,  # _schedule -> ready_queue; actor call -> outbox
    (S.SCHEDULING, E.SEND): S.REMOTE,  # run_remote
    (S.QUEUED, E.SEND): S.REMOTE,  # pump_actor to the actor's host
    (S.QUEUED, E.DISPATCH): S.RUNNING,  # _dispatch/_run_on, _send_actor_call
    (S.RUNNING, E.YIELD): S.STREAMING,  # _on_yield
    (S.RUNNING, E.RETRY): S.QUEUED,  # _on_worker_died / _on_done retryable error
    (S.RUNNING, E.COMPLETE): S.FINISHED,  # _complete
    (S.REMOTE, E.RESEND): S.REMOTE,  # _resend after the session broke or moved
    (S.REMOTE, E.YIELD): S.STREAMING,  # _on_session_reply yield
    (S.REMOTE, E.RETRY): S.SCHEDULING,  # _peer_gone / done with a retryable error
    (S.REMOTE, E.SPILL): S.SCHEDULING,  # Placer.rejected: the executor's queue was full
    (S.REMOTE, E.QUEUE): S.QUEUED,  # run_remote found no session; _actor_call_lost
    (S.REMOTE, E.COMPLETE): S.FINISHED,  # _complete_remote
    (S.STREAMING, E.YIELD): S.STREAMING,
    (S.STREAMING, E.RESEND): S.STREAMING,  # re-sent with `got`
    (S.STREAMING, E.COMPLETE): S.FINISHED,
    (S.CANCELLING, E.YIELD): S.CANCELLING,
    (S.CANCELLING, E.COMPLETE): S.FINISHED,  # it finished before the cancel took
}
for _state in (S.RUNNING, S.REMOTE, S.STREAMING, S.CANCELLING):
    TASK_MOVES[_state, E.CANCEL] = S.CANCELLING  # cancel_task of a running task
for _state in TaskState:
    if _state not in (S.FINISHED, S.FAILED):
        TASK_MOVES[_state, E.FAIL] = S.FAILED  # _fail / _fail_with_blob (cancelled before run)

ACTOR_MOVES = {
    (ActorState.PENDING, ActorEvent.STARTED): ActorState.ALIVE,  # _spawn_actor_worker
    (ActorState.PENDING, ActorEvent.DIED): ActorState.DEAD,  # unschedulable, argument failed
    (ActorState.ALIVE, ActorEvent.RESTART): ActorState.RESTARTING,  # worker/host died
    (ActorState.ALIVE, ActorEvent.DIED): ActorState.DEAD,  # killed, constructor raised
    (ActorState.RESTARTING, ActorEvent.STARTED): ActorState.ALIVE,
    (ActorState.RESTARTING, ActorEvent.DIED): ActorState.DEAD,  # argument failed on restart
}


@pytest.mark.parametrize(("move", "target"), sorted(TASK_MOVES.items(), key=str))
def test_every_legal_task_move(move, target):
    assert task_transition(*move) is target


@pytest.mark.parametrize(("move", "target"), sorted(ACTOR_MOVES.items(), key=str))
def test_every_legal_actor_move(move, target):
    assert actor_transition(*move) is target


def test_tables_hold_exactly_the_moves_and_every_other_pair_is_refused():
    assert dict(TASK_TRANSITIONS) == TASK_MOVES
    assert dict(ACTOR_TRANSITIONS) == ACTOR_MOVES
    refused = 0
    for state in TaskState:
        for event in TaskEvent:
            if (state, event) in TASK_MOVES:
                continue
            with pytest.raises(IllegalTransition) as info:
                task_transition(state, event)
            assert info.value.state is state and info.value.event is event
            assert state.name in str(info.value) and event.name in str(info.value)
            refused += 1
    for state in ActorState:
        for event in ActorEvent:
            if (state, event) not in ACTOR_MOVES:
                with pytest.raises(IllegalTransition):
                    actor_transition(state, event)
                refused += 1
    assert refused > 0


def test_the_promises_the_runtime_relies_on():
    # a stream that yielded, and a cancelled task, are never run again
    for state in (S.STREAMING, S.CANCELLING):
        for event in (E.RETRY, E.QUEUE, E.DISPATCH, E.SEND):
            with pytest.raises(IllegalTransition):
                task_transition(state, event)
    # nothing happens to a task after its end, nor to a dead actor
    for state in TASK_TERMINAL:
        for event in TaskEvent:
            with pytest.raises(IllegalTransition):
                task_transition(state, event)
    for event in ActorEvent:
        with pytest.raises(IllegalTransition):
            actor_transition(ActorState.DEAD, event)


def test_one_actor_state_enum_shared_with_the_cluster_state():
    assert ActorState is crdt_actors.ActorState
    assert [s.value for s in ActorState] == ["pending", "alive", "restarting", "dead"]


def _reachable(start, table):
    seen, todo = {start}, [start]
    while todo:
        state = todo.pop()
        for (source, _event), target in table.items():
            if source is state and target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


def test_every_state_is_reachable_and_can_end():
    assert _reachable(S.RESOLVING, TASK_TRANSITIONS) == set(TaskState)
    assert _reachable(ActorState.PENDING, ACTOR_TRANSITIONS) == set(ActorState)
    for state in TaskState:
        assert _reachable(state, TASK_TRANSITIONS) & TASK_TERMINAL
    for state in ActorState:
        assert ActorState.DEAD in _reachable(state, ACTOR_TRANSITIONS)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(list(TaskEvent)), max_size=40))
def test_random_task_event_sequences(events):
    """Apply events, skipping the refused ones (as a caller that checks first would): the state
    follows the table, a refused event leaves it unchanged, and the lifecycle's promises hold
    along the way."""
    state = S.RESOLVING
    ran = streamed = cancelled = False
    for event in events:
        expected = TASK_TRANSITIONS.get((state, event))
        try:
            new = task_transition(state, event)
        except IllegalTransition:
            assert expected is None
            continue
        assert new is expected
        if state in (S.STREAMING, S.CANCELLING):
            assert new in (S.STREAMING, S.CANCELLING, S.FINISHED, S.FAILED)
        if streamed:  # once an item went out, never queued, placed or run again
            assert new not in (S.QUEUED, S.SCHEDULING, S.RUNNING, S.RESOLVING)
        if cancelled:
            assert new in (S.CANCELLING, S.FINISHED, S.FAILED)
        ran = ran or new in (S.RUNNING, S.REMOTE)
        streamed = streamed or new is S.STREAMING
        cancelled = cancelled or new is S.CANCELLING
        if new in (S.FINISHED, S.CANCELLING):  # results, and cancels, only of a run
            assert ran
        state = new
    if state in TASK_TERMINAL:
        with pytest.raises(IllegalTransition):
            task_transition(state, TaskEvent.FAIL)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(list(ActorEvent)), max_size=20))
def test_random_actor_event_sequences(events):
    state = ActorState.PENDING
    for event in events:
        expected = ACTOR_TRANSITIONS.get((state, event))
        try:
            new = actor_transition(state, event)
        except IllegalTransition:
            assert expected is None
            continue
        assert new is expected
        assert state is not ActorState.DEAD  # nothing leaves DEAD
        if new is ActorState.RESTARTING:
            assert state is ActorState.ALIVE  # only a running actor restarts
        state = new
