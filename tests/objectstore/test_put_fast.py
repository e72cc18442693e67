"""Fast put path: payload pieces, block-by-block copy+hash, and the per-process warm spare."""

import multiprocessing
import os

import numpy as np
import pyarrow as pa
import pytest

from latticaray.objectstore.cid import BLAKE3, SHA2_256, blake3_available
from latticaray.objectstore.serialization import serialize
from latticaray.objectstore.store import WARM_MIN_BYTES, LocalStore

MB = 1 << 20


def _assemble(ser) -> bytes:
    out = bytearray(ser.nbytes)
    for offset, piece in ser.pieces:
        out[offset : offset + piece.nbytes] = piece
    return bytes(out)


@pytest.mark.parametrize(
    "value",
    [
        np.arange(300_000, dtype=np.float64),
        np.arange(600_000, dtype=np.int32).reshape(3, -1),
        np.ones((512, 1024, 3), dtype=np.uint8),
        {
            "a": np.arange(400_000, dtype=np.float32),
            "b": [1, 2, 3],
            "c": np.zeros(17, dtype=np.int8),
        },
        ["small", b"x" * 100],
    ],
)
def test_payload_pieces_are_exactly_the_written_payload(value):
    ser = serialize(value)
    assert ser.pieces is not None
    assert _assemble(ser) == ser.to_bytes()


def test_arrow_streams_and_fortran_arrays_have_no_pieces_and_still_store():
    assert serialize(pa.table({"x": np.arange(10)})).pieces is None
    assert serialize(np.asfortranarray(np.ones((2048, 512)))).pieces is None


def _hashes():
    return [SHA2_256] + ([BLAKE3] if blake3_available() else [])


@pytest.mark.parametrize("hash_code", _hashes())
def test_warm_put_gives_the_same_cid_and_bytes_as_the_plain_path(make_store, hash_code):
    array = np.random.default_rng(3).standard_normal(WARM_MIN_BYTES // 8 + 12345)
    plain = make_store("plain", hash_code=hash_code, warm=False)
    fast = make_store("fast", hash_code=hash_code)
    expected = plain.put(array)
    first = fast.put(array)  # no spare yet: plain path; then a spare is prepared
    assert first == expected
    fast.delete(first)
    assert fast.wait_warm(60)
    stats = fast.stats()
    assert (
        stats["warm"] > array.nbytes
        and stats["used"] + stats["reserved"] + stats["warm"] <= fast.capacity
    )
    spare = [n for n in os.listdir(os.path.join(fast.root, "tmp")) if n.endswith("-warm")]
    assert len(spare) == 1
    second = fast.put(array)  # written into the spare
    assert second == expected
    assert spare[0] not in os.listdir(os.path.join(fast.root, "tmp"))
    got = LocalStore.attach(fast.root).get(second)
    assert not got.flags.writeable and np.array_equal(got, array)
    sealed = os.path.getsize(os.path.join(fast.root, "objects", str(second)))
    assert sealed == os.path.getsize(os.path.join(plain.root, "objects", str(expected)))
    fast.wait_warm(60)
    fast.close()
    assert fast.stats()["warm"] == 0 and os.listdir(os.path.join(fast.root, "tmp")) == []


def test_pickled_objects_with_large_buffers_take_the_warm_path(make_store):
    value = {"weights": np.arange(WARM_MIN_BYTES // 4, dtype=np.float32), "name": "w"}
    store = make_store()
    store.delete(store.put(value))
    assert store.wait_warm(60)
    spare = [n for n in os.listdir(os.path.join(store.root, "tmp")) if n.endswith("-warm")]
    cid = store.put(value)
    assert spare and spare[0] not in os.listdir(os.path.join(store.root, "tmp"))
    got = store.get(cid)
    assert got["name"] == "w" and np.array_equal(got["weights"], value["weights"])
    assert cid == make_store("plain", warm=False).put(value)


def test_spare_is_made_only_from_free_room(make_store):
    array = np.zeros(WARM_MIN_BYTES, dtype=np.uint8)
    # capacity // 8 is below the spare's size: never made
    small = make_store("small", capacity_bytes=4 * WARM_MIN_BYTES)
    small.put(array)
    assert not small.wait_warm(30) and small.stats()["warm"] == 0
    # a pinned object leaves less than twice the spare's size free: not made, nothing evicted
    tight = make_store("tight", capacity_bytes=20 * WARM_MIN_BYTES)
    pinned = tight.put(np.ones(250 * MB, dtype=np.uint8), pin=True)
    other = tight.put(array)
    assert not tight.wait_warm(30) and tight.stats()["warm"] == 0
    assert tight.in_memory(pinned) and tight.in_memory(other)


def test_spares_of_all_processes_stay_within_an_eighth_of_capacity(make_store):
    store = make_store(capacity_bytes=32 * WARM_MIN_BYTES)  # spares: at most 4 x 16 MiB in all
    store.put(np.zeros(WARM_MIN_BYTES + MB, dtype=np.uint8))  # wants a 32 MiB spare
    assert store.wait_warm(60) and store.stats()["warm"] == 2 * WARM_MIN_BYTES
    other = LocalStore.attach(store.root)
    other.put(np.ones(2 * WARM_MIN_BYTES + MB, dtype=np.uint8))  # wants 48 MiB: 32 + 48 > 64
    assert not other.wait_warm(30)
    assert store.stats()["warm"] == 2 * WARM_MIN_BYTES
    other.close()
    store.close()


def test_own_spare_gives_way_to_a_put_that_needs_its_room(make_store):
    store = make_store(capacity_bytes=20 * WARM_MIN_BYTES, spill_capacity_bytes=0)
    store.put(np.zeros(WARM_MIN_BYTES, dtype=np.uint8), pin=True)
    assert store.wait_warm(60) and store.stats()["warm"] == 2 * WARM_MIN_BYTES
    big = np.ones(18 * WARM_MIN_BYTES, dtype=np.uint8)  # fits only without the spare
    cid = store.put(big, pin=True)
    assert store.in_memory(cid)
    stats = store.stats()
    assert stats["used"] + stats["reserved"] + stats["warm"] <= store.capacity


def _child_leaves_spare(root, queue):
    client = LocalStore.attach(root)
    client.put(np.zeros(WARM_MIN_BYTES, dtype=np.uint8))
    queue.put(client.wait_warm(60))
    queue.close()
    queue.join_thread()
    os._exit(0)  # no atexit hooks: the spare and its reservation are left behind, as if killed


def _child_exits_normally(root, queue):
    client = LocalStore.attach(root)
    client.put(np.ones(WARM_MIN_BYTES, dtype=np.uint8))
    queue.put(client.wait_warm(60))


def test_spares_of_exited_and_killed_processes_do_not_leak(make_store):
    store = make_store(capacity_bytes=24 * WARM_MIN_BYTES, spill_capacity_bytes=0)
    ctx = multiprocessing.get_context("spawn")
    for target in (_child_exits_normally, _child_leaves_spare):
        queue = ctx.Queue()
        child = ctx.Process(target=target, args=(store.root, queue))
        child.start()
        try:
            assert queue.get(timeout=90) is True
        finally:
            child.join(timeout=60)
            if child.is_alive():  # pragma: no cover
                child.kill()
                child.join(timeout=10)
        if target is _child_exits_normally:
            assert store.stats()["warm"] == 0  # closed by its exit hook
            assert os.listdir(os.path.join(store.root, "tmp")) == []
    assert store.stats()["warm"] > 0  # the killed child's spare
    # the next spare made anywhere reclaims it first
    store.put(np.full(WARM_MIN_BYTES, 3, dtype=np.uint8))
    assert store.wait_warm(60)
    warm_files = [n for n in os.listdir(os.path.join(store.root, "tmp")) if n.endswith("-warm")]
    assert len(warm_files) == 1 and warm_files[0].startswith(f"{os.getpid()}-")
    store.close()
    # a put that needs the room reclaims the dead process's reservation and file
    cid = store.put(np.full(20 * WARM_MIN_BYTES, 7, dtype=np.uint8))
    assert store.in_memory(cid) and store.stats()["warm"] == 0
    assert not [n for n in os.listdir(os.path.join(store.root, "tmp")) if n.endswith("-warm")]


def test_arrow_tables_without_pieces_take_the_warm_path_too(make_store):
    table = pa.table({"x": np.arange(WARM_MIN_BYTES // 8 + 1000, dtype=np.int64)})
    store = make_store()
    store.delete(store.put(table))
    assert store.wait_warm(60)
    spare = [n for n in os.listdir(os.path.join(store.root, "tmp")) if n.endswith("-warm")]
    cid = store.put(table)
    assert spare and spare[0] not in os.listdir(os.path.join(store.root, "tmp"))
    assert store.get(cid).equals(table)
    assert cid == make_store("plain", warm=False).put(table)
