"""State rows, their wire codec, snapshot gathering, filters, summaries and the text views."""

import asyncio
import dataclasses

import msgpack
import pytest
from statefakes import CONE, DRIVER, GONE, LOCAL, PUBLIC, SYMMETRIC, FakeSource

from latticaray.observe import query, text
from latticaray.observe.gather import decode_snapshot, encode_snapshot, gather
from latticaray.observe.model import (
    NodeReport,
    NodeRow,
    ReportDecodeError,
    StateSource,
    TaskRow,
    decode_report,
    encode_report,
)
from latticaray.util import state


def test_fake_source_is_a_state_source():
    assert isinstance(FakeSource(), StateSource)


def test_report_round_trips_through_the_wire():
    report = FakeSource().local_report()
    back = decode_report(encode_report(report))
    assert back == report
    assert back.node.resources_total == report.node.resources_total
    assert isinstance(back.node.addrs, tuple)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda p: p.__setitem__(0, 2), "version"),
        (lambda p: p[1].__setitem__(0, 5), "NodeRow.node_id"),
        (lambda p: p[1].__setitem__(9, "many"), "NodeRow.tasks_running"),
        (lambda p: p[1].__setitem__(7, {"CPU": "x"}), "NodeRow.resources_total"),
        (lambda p: p[1].__setitem__(9, True), "NodeRow.tasks_running"),
        (lambda p: p[3].append([1, 2]), "TaskRow.task_id"),
        (lambda p: p[3].append("t"), "TaskRow"),
        (lambda p: p.__setitem__(7, -1), "truncated"),
        (lambda p: p.pop(), "array of its parts"),
    ],
)
def test_bad_reports_are_refused_with_the_field_named(mutate, message):
    parts = msgpack.unpackb(encode_report(FakeSource().local_report()), raw=False)
    mutate(parts)
    with pytest.raises(ReportDecodeError, match=message):
        decode_report(msgpack.packb(parts))


def test_oversized_and_garbage_reports_are_refused():
    with pytest.raises(ReportDecodeError):
        decode_report(b"\xc1garbage")
    with pytest.raises(ReportDecodeError):
        decode_report(b"\x00" * (9 << 20))
    long_id = NodeRow(node_id="x" * 5000)
    with pytest.raises(ReportDecodeError, match="4096"):
        decode_report(encode_report(NodeReport(long_id)))


def test_newer_peers_may_add_trailing_fields():
    parts = msgpack.unpackb(encode_report(FakeSource().local_report()), raw=False)
    parts[1].append("a field from the future")
    parts.append("another part")
    assert decode_report(msgpack.packb(parts)).node.node_id == DRIVER


def test_rows_read_like_dicts_too():
    row = TaskRow(task_id="t1", name="f")
    assert row["name"] == "f" and row.get("missing", 3) == 3
    assert row.as_dict()["task_id"] == "t1"
    with pytest.raises(KeyError):
        row["nope"]


def test_gather_merges_every_member_and_marks_the_silent_one():
    source = FakeSource()
    snap = asyncio.run(gather(source, timeout=2))
    assert sorted(source.asked) == sorted([LOCAL, PUBLIC, CONE, SYMMETRIC, GONE])
    by_id = {n.node_id: n for n in snap.nodes}
    assert set(by_id) == {DRIVER, LOCAL, PUBLIC, CONE, SYMMETRIC, GONE}
    assert by_id[GONE].state == "UNREACHABLE" and by_id[GONE].stale
    assert "TimeoutError" in snap.errors[GONE]
    assert by_id[DRIVER].is_self and not by_id[PUBLIC].stale
    # t0002 is pending at its owner and running where it runs: the furthest state wins
    t2 = [t for t in snap.tasks if t.task_id == "t0002"]
    assert len(t2) == 1 and t2[0].state == "RUNNING" and t2[0].worker_pid == 4343
    assert {a.actor_id for a in snap.actors} == {"a1", "a2", "a3"}
    assert {(lk.dst, lk.path) for lk in snap.links if lk.src == DRIVER} == {
        (LOCAL, "unix"),
        (PUBLIC, "direct"),
        (CONE, "punched"),
        (SYMMETRIC, "relayed"),
    }


def test_gather_respects_the_deadline_and_the_node_cap():
    source = FakeSource(delay=5.0)
    snap = asyncio.run(gather(source, timeout=0.2))
    assert set(snap.errors) == {LOCAL, PUBLIC, CONE, SYMMETRIC, GONE}
    capped = asyncio.run(gather(FakeSource(), max_nodes=3))
    assert len(capped.nodes) == 6  # two asked, the rest as the membership view has them
    assert sum(1 for n in capped.nodes if not n.stale) == 3
    local_only = asyncio.run(gather(FakeSource(), remote=False))
    assert sum(1 for n in local_only.nodes if not n.stale) == 1


def test_gather_refuses_a_report_from_the_wrong_node():
    class Liar(FakeSource):
        async def remote_report(self, node_id, limit, timeout):
            return self.report_of(PUBLIC, limit)

    snap = asyncio.run(gather(Liar(), timeout=1))
    assert "answered as" in snap.errors[CONE]


def test_filters_work_as_rays():
    snap = asyncio.run(gather(FakeSource()))
    running = query.list_rows(snap, "tasks", [("state", "=", "running")])
    assert running and all(t.state == "RUNNING" for t in running)
    not_running = query.list_rows(snap, "tasks", [("state", "!=", "RUNNING")])
    assert len(running) + len(not_running) == len(snap.tasks)
    big = query.list_rows(snap, "objects", [("object_size", ">", 1 << 20)])
    assert big and all(o.object_size > 1 << 20 for o in big)
    assert query.list_rows(snap, "nodes", [("is_self", "=", "true")])[0].node_id == DRIVER
    assert query.list_rows(snap, "actors", [("name", "=", "none")])  # None matches "none"
    assert len(query.list_rows(snap, "tasks", limit=3)) == 3
    with pytest.raises(ValueError, match="filterable"):
        query.list_rows(snap, "tasks", [("colour", "=", "red")])
    with pytest.raises(ValueError, match="predicate"):
        query.list_rows(snap, "tasks", [("state", "~", "x")])
    with pytest.raises(ValueError, match="needs a number"):
        query.list_rows(snap, "tasks", [("attempt_number", ">", "many")])
    with pytest.raises(ValueError, match="unknown kind"):
        query.list_rows(snap, "jobs")


def test_summaries_count_by_name_and_state():
    snap = asyncio.run(gather(FakeSource()))
    tasks = query.summarize_tasks(snap)["cluster"]
    assert tasks["summary"]["square"]["state_counts"]["RUNNING"] >= 1
    assert tasks["total_tasks"] + tasks["total_actor_tasks"] == len(snap.tasks)
    actors = query.summarize_actors(snap)["cluster"]
    assert actors["summary"]["Counter"]["state_counts"] == {"ALIVE": 1, "DEAD": 1}
    objects = query.summarize_objects(snap)["cluster"]
    assert objects["total_objects"] == len(snap.objects)


def test_state_api_with_a_source_and_without_one():
    source = FakeSource()
    with pytest.raises(state.StateApiError, match=GONE):
        state.list_nodes(source)
    nodes = state.list_nodes(source, raise_on_missing_output=False)
    assert len(nodes) == 6
    alive = state.list_actors(
        source, filters=[("state", "=", "ALIVE")], raise_on_missing_output=False
    )
    assert {a.class_name for a in alive} == {"Counter", "Trainer"}
    with pytest.raises(state.StateApiError, match="init"):
        state.list_tasks()


def test_status_text_shows_paths_resources_and_silence():
    snap = asyncio.run(gather(FakeSource()))
    out = text.format_status(snap)
    for path in ("self", "unix", "direct", "punched", "relayed"):
        assert path in out
    assert "74.2 ms" in out and "UNREACHABLE" in out and "no report from" in out
    assert "transfer bafyreibigobject out" in out and "relayed" in out
    table = text.format_table(query.list_rows(snap, "actors"), text.DEFAULT_COLUMNS["actors"])
    assert table.splitlines()[0].split()[:3] == ["ACTOR_ID", "CLASS_NAME", "NAME"]
    assert len(table.splitlines()) == 1 + len(snap.actors)
    assert text.format_table([]) == "(none)"


def test_rows_are_frozen():
    row = TaskRow(task_id="t")
    with pytest.raises(dataclasses.FrozenInstanceError):
        row.name = "x"


def test_snapshot_round_trips_for_local_clients():
    snap = asyncio.run(gather(FakeSource()))
    back = decode_snapshot(encode_snapshot(snap))
    assert back.as_dict() == snap.as_dict()
    parts = msgpack.unpackb(encode_snapshot(snap), raw=False)
    parts[8] = {"x": 1}
    with pytest.raises(ReportDecodeError, match="errors"):
        decode_snapshot(msgpack.packb(parts))
    with pytest.raises(ReportDecodeError):
        decode_snapshot(b"\x93")
