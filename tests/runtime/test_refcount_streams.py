"""Reference counting of streamed items (tasks with num_returns="streaming").

An item a streaming generator yields is counted like a task's return: the generator holds it
until a process takes it, the taker holds it until its last ref is dropped, items nobody took are
released with the generator, and refs inside an item's value live as long as the item. Checked on
an embedded runtime (store usage back to its baseline) and across nodes (a driver plus two node
processes, items produced on another node with refs owned there inside them).
"""

import gc

import numpy as np
import pytest
from meshutil import driver_with_nodes, wait_for

import latticaray as lattica
from latticaray.runtime import api, context, serialization
from latticaray.runtime.refcount import RefTable

N = 300_000  # 2.4 MB of float64: above the store threshold
WINDOW = 16  # the default stream window (node.DEFAULT_STREAM_WINDOW)


@lattica.remote(num_returns="streaming")
def big_items(count):
    for i in range(count):
        yield np.full(N, float(i))


@lattica.remote(num_returns="streaming")
def items_with_refs(count):
    for i in range(count):
        ref = lattica.put(np.full(N, float(i)))
        yield [ref, ref.cid]


@lattica.remote
def in_store_here(cid):
    return serialization.get_store().contains(cid)


def drop_refs() -> None:
    """Finalize unreachable refs and generators and send their releases to the node now."""
    gc.collect()
    context.current_core().flush_releases()


def node():
    return api._runtime.node


def store_used() -> int:
    return node().store.stats()["used"]


def stream_finished(tid: bytes) -> bool:
    stream = node().streams.states.get(tid)
    return stream is not None and stream.finished


def no_items_left(tid: bytes) -> bool:
    n = node()
    return (
        not any(oid[:16] == tid for oid in n.objects.entries)
        and not any(oid[:16] == tid for oid in n.refs.counts)
        and tid not in n.refs.streamed
        and tid not in n.refs.dropped_streams
    )


@pytest.fixture(scope="class")
def local():
    lattica.init(num_cpus=2)
    yield
    lattica.shutdown()


@pytest.fixture(scope="class")
def mesh():
    with driver_with_nodes(2) as cluster:
        yield cluster


@pytest.mark.usefixtures("local")
class TestEmbedded:
    def test_consumed_items_are_freed_when_dropped(self):
        baseline = store_used()
        gen = big_items.remote(8)
        tid = gen.task_id()
        for i, ref in enumerate(gen):
            assert float(lattica.get(ref)[0]) == float(i)
        del ref, gen
        drop_refs()
        wait_for(
            lambda: store_used() <= baseline and no_items_left(tid),
            20,
            "the store to return to its baseline after the items were dropped",
        )

    def test_items_nobody_took_are_released_with_the_generator(self):
        baseline = store_used()
        gen = big_items.remote(6)
        tid = gen.task_id()
        kept = next(gen)
        wait_for(lambda: stream_finished(tid), 30, "the stream to finish")
        assert store_used() >= baseline + 5 * N * 8  # five items waiting in the generator
        del gen
        drop_refs()
        # the item taken stays readable; the five others go
        wait_for(
            lambda: store_used() < baseline + 2 * N * 8,
            20,
            "the untaken items to be released with their generator",
        )
        assert float(lattica.get(kept).sum()) == 0.0
        assert kept.id in node().objects.entries
        del kept
        drop_refs()
        wait_for(
            lambda: store_used() <= baseline and no_items_left(tid),
            20,
            "the kept item to be released",
        )

    def test_dropped_generator_lets_its_task_finish_and_frees_what_it_yields(self):
        baseline = store_used()
        gen = big_items.remote(3 * WINDOW)  # more than a window: the producer waits for acks
        tid = gen.task_id()
        first = next(gen)
        del gen
        drop_refs()
        wait_for(
            lambda: tid not in node().tasks.records,
            60,
            "the task to finish although nobody consumes its stream",
        )
        assert float(lattica.get(first)[0]) == 0.0
        del first
        drop_refs()
        wait_for(
            lambda: (
                store_used() <= baseline and no_items_left(tid) and tid not in node().streams.states
            ),
            20,
            "every item of the dropped stream to be released",
        )

    def test_ref_inside_an_item_lives_until_the_item_is_released(self):
        baseline = store_used()
        gen = items_with_refs.remote(3)
        tid = gen.task_id()
        items = list(gen)
        inner = [lattica.get(item) for item in items]
        cids = [cid for _ref, cid in inner]
        assert all(node().store.contains(cid) for cid in cids)
        del inner, gen
        drop_refs()
        # only the items hold the refs inside them now
        assert all(node().store.contains(cid) for cid in cids)
        kept = items.pop(0)
        del items
        drop_refs()
        wait_for(
            lambda: not any(node().store.contains(cid) for cid in cids[1:]),
            20,
            "refs inside dropped items to be released",
        )
        assert node().store.contains(cids[0])
        ref, _cid = lattica.get(kept)
        assert float(lattica.get(ref).sum()) == 0.0
        del ref, kept
        drop_refs()
        wait_for(
            lambda: (
                not node().store.contains(cids[0])
                and store_used() <= baseline
                and no_items_left(tid)
            ),
            20,
            "the last item and the ref inside it to go",
        )

    def test_a_worker_consuming_a_stream_holds_and_releases_its_items(self):
        baseline = store_used()
        gen = big_items.remote(4)
        tid = gen.task_id()
        assert lattica.get(sum_of_stream.remote(gen), timeout=60) == float(0 + 1 + 2 + 3) * N
        del gen
        drop_refs()
        wait_for(
            lambda: store_used() <= baseline and no_items_left(tid),
            20,
            "the items a worker took to be released once it dropped them",
        )

    def test_items_of_a_dead_submitter_are_released(self):
        baseline = store_used()
        holder = StreamHolder.remote()
        tid = lattica.get(holder.start.remote(4), timeout=60)
        wait_for(lambda: stream_finished(tid), 30, "the stream to finish")
        assert store_used() >= baseline + 4 * N * 8
        lattica.kill(holder)  # its worker dies holding the generator and one item
        wait_for(
            lambda: (
                store_used() <= baseline and no_items_left(tid) and tid not in node().streams.states
            ),
            20,
            "the items of the dead actor's stream to be released",
        )


@lattica.remote
class StreamHolder:
    def start(self, count):
        self.gen = big_items.remote(count)
        self.first = next(self.gen)
        return self.gen.task_id()


@lattica.remote
def sum_of_stream(gen):
    return float(sum(lattica.get(ref).sum() for ref in gen))


class TestAcrossNodes:
    def test_items_from_another_node_and_refs_inside_them(self, mesh):
        other = mesh["nodes"][0].node_id
        strategy = lattica.NodeAffinitySchedulingStrategy(other)
        probe = in_store_here.options(scheduling_strategy=strategy)
        gen = items_with_refs.options(scheduling_strategy=strategy).remote(4)
        tid = gen.task_id()
        taken = [next(gen) for _ in range(3)]
        wait_for(lambda: stream_finished(tid), 60, "the remote stream to finish")
        values = [lattica.get(item, timeout=60) for item in taken]
        refs = [ref for ref, _cid in values]
        cids = [cid for _ref, cid in values]
        assert all(ref.owner == other for ref in refs)
        assert [float(lattica.get(ref, timeout=60)[0]) for ref in refs] == [0.0, 1.0, 2.0]
        assert all(lattica.get(probe.remote(cid), timeout=30) for cid in cids)
        del values, refs
        kept = taken.pop(0)
        kept_id = kept.id
        del taken, gen  # item 3 was never taken: it goes with the generator
        drop_refs()
        wait_for(
            lambda: not any(lattica.get(probe.remote(cid), timeout=30) for cid in cids[1:]),
            30,
            "the owner node to delete objects inside the dropped items",
        )
        wait_for(
            lambda: not any(oid[:16] == tid and oid != kept_id for oid in node().objects.entries),
            20,
            "the dropped and untaken items to leave the driver",
        )
        # the kept item still holds the object inside it on the other node
        assert lattica.get(probe.remote(cids[0]), timeout=30)
        ref, _cid = lattica.get(kept, timeout=60)
        assert float(lattica.get(ref, timeout=60).sum()) == 0.0
        del ref, kept
        drop_refs()
        wait_for(
            lambda: not lattica.get(probe.remote(cids[0]), timeout=30),
            30,
            "the object inside the last item to be deleted on its owner",
        )
        wait_for(lambda: no_items_left(tid), 20, "the last item to leave the driver")
        assert not node().refs.forwarded


def test_table_untaken_items_go_with_the_generator_and_late_items_at_once():
    class Node:
        """What RefTable uses of a RuntimeNode (and of its object table: ``entries``, ``free``)."""

        node_id = "me"
        remote = None
        entries = {b"t" * 16 + bytes([i]): object() for i in range(4)}
        freed = []

        def __init__(self):
            self.objects = self

        def free(self, oids):
            self.freed.extend(oids)

    class Client:
        kind = "driver"
        ref_holds = {}

    table, client = RefTable(Node()), Client()
    tid = b"t" * 16
    a, b, c, d = (tid + bytes([i]) for i in range(4))
    table.open_stream(tid, client)
    assert table.stream_item(tid, a) and table.stream_item(tid, b)
    assert table.take_item(tid, a, client) and not table.take_item(tid, a, client)
    assert client.ref_holds == {a: 1}
    table.drop_stream(tid, running=True)
    assert table.node.freed == [b]
    assert not table.stream_item(tid, c)  # yielded after the drop: freed on arrival
    assert table.node.freed == [b, c]
    table.stream_end(tid)
    assert table.stream_item(tid, d) and d not in table.counts  # not a stream of this table
    table.release([a], client)
    assert table.node.freed == [b, c, a] and not table.counts and not table.streamed
