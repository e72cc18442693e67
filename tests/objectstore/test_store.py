"""Local shm store: budget, LRU eviction and spill, pins, dedup, crash safety, other processes."""

import multiprocessing
import os
import threading

import numpy as np
import pytest

from latticaray.objectstore.cid import Cid
from latticaray.objectstore.errors import BlockVerificationError, ObjectNotFound, StoreFull
from latticaray.objectstore.manifest import build_manifest
from latticaray.objectstore.serialization import serialize
from latticaray.objectstore.store import LocalStore

MB = 1 << 20


def _blob(seed: int, size: int = MB) -> np.ndarray:
    return np.full(size, seed % 251, dtype=np.uint8)


def test_eviction_and_spill_keep_budget_and_pins(make_store):
    store = make_store(capacity_bytes=5 * MB + MB // 2, spill_capacity_bytes=3 * MB + MB // 2)
    pinned = [store.put(_blob(i), pin=True) for i in range(2)]
    others = []
    for i in range(2, 10):
        others.append(store.put(_blob(i)))
        stats = store.stats()
        assert stats["used"] + stats["reserved"] <= store.capacity
        assert stats["spill_used"] <= store.spill_capacity
    for cid in pinned:
        assert store.in_memory(cid) and store.is_pinned(cid)
    # the oldest unpinned objects were spilled, then the oldest spilled were dropped
    assert not store.contains(others[0])
    assert any(store.is_spilled(c) for c in others)
    spilled = next(c for c in others if store.is_spilled(c))
    # transparent restore, still within budget
    assert int(store.get(spilled)[0]) == others.index(spilled) + 2
    assert store.in_memory(spilled)
    assert store.stats()["used"] <= store.capacity
    for i, cid in enumerate(pinned):
        assert int(store.get(cid)[0]) == i


def test_put_that_cannot_fit_beside_pinned_objects_raises_store_full(make_store):
    store = make_store(capacity_bytes=3 * MB, spill_capacity_bytes=0)
    store.put(_blob(1), pin=True)
    store.put(_blob(2), pin=True)
    with pytest.raises(StoreFull):
        store.put(_blob(3))
    with pytest.raises(StoreFull, match="exceeds the store capacity"):
        store.put(_blob(4, 4 * MB))
    assert store.stats()["reserved"] == 0


def test_lru_order_follows_gets(make_store):
    store = make_store(capacity_bytes=3 * MB + MB // 2, spill_capacity_bytes=0)
    first, second, third = (store.put(_blob(i)) for i in range(3))
    store.get(first)  # first becomes most recently used
    os.utime(os.path.join(store.root, "objects", str(second)), ns=(1, 1))
    os.utime(os.path.join(store.root, "objects", str(third)), ns=(2, 2))
    store.put(_blob(3))
    assert store.contains(first) and not store.contains(second) and store.contains(third)


def test_unpin_makes_object_evictable(make_store):
    store = make_store(capacity_bytes=2 * MB + MB // 2, spill_capacity_bytes=0)
    cid = store.put(_blob(1), pin=True)
    store.put(_blob(2))
    store.unpin(cid)
    store.put(_blob(3))
    store.put(_blob(4))
    assert not store.contains(cid)
    with pytest.raises(ObjectNotFound):
        store.get(cid)


def test_concurrent_puts_of_same_content_are_deduplicated(make_store):
    store = make_store()
    value = np.arange(3 * MB, dtype=np.uint8)
    results, errors = [], []

    def put():
        try:
            results.append(LocalStore.attach(store.root).put(value))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=put) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors and len(set(results)) == 1 and len(results) == 6
    stats = store.stats()
    assert stats["objects"] == 1 and stats["reserved"] == 0
    assert stats["used"] == os.path.getsize(os.path.join(store.root, "objects", str(results[0])))
    assert os.listdir(os.path.join(store.root, "tmp")) == []


def _child_put_and_get(root, requests, replies):
    client = LocalStore.attach(root)
    cid = client.put({"from": "child", "data": np.arange(MB, dtype=np.int64)})
    parent_value = client.get(requests.get(timeout=30))
    replies.put((str(cid), int(parent_value.sum()), bool(parent_value.flags.writeable)))


def test_another_process_puts_and_reads_zero_copy(make_store):
    store = make_store()
    parent_cid = store.put(np.arange(1000, dtype=np.int64))
    ctx = multiprocessing.get_context("spawn")
    requests, replies = ctx.Queue(), ctx.Queue()
    child = ctx.Process(target=_child_put_and_get, args=(store.root, requests, replies))
    child.start()
    try:
        requests.put(str(parent_cid))
        child_cid, total, writeable = replies.get(timeout=60)
    finally:
        child.join(timeout=30)
        if child.is_alive():  # pragma: no cover
            child.kill()
    assert total == sum(range(1000)) and not writeable
    value = store.get(child_cid)
    assert value["from"] == "child" and int(value["data"][-1]) == MB - 1


def test_half_written_object_is_never_visible_and_is_cleaned(make_store):
    store = make_store()
    ser = serialize(np.arange(MB, dtype=np.uint8))
    payload = ser.to_bytes()
    manifest = build_manifest(payload, ser.meta)
    writer = store.open_writer(manifest)
    writer.write_block(0, manifest.blocks and payload[:MB])
    assert not store.contains(manifest.root)
    with pytest.raises(ObjectNotFound):
        store.get(manifest.root)
    # simulate a crash: a temp file left by a dead process is removed when the store reopens
    dead_temp = os.path.join(store.root, "tmp", "999999-deadbeef")
    with open(dead_temp, "wb") as file:
        file.write(b"partial")
    writer.abort()
    LocalStore(store.root, capacity_bytes=store.capacity, spill_dir=store.spill_dir)
    assert not os.path.exists(dead_temp)
    assert store.stats()["reserved"] == 0


def test_writer_verifies_blocks_and_seals(make_store):
    store = make_store()
    ser = serialize(np.arange(3 * MB // 8, dtype=np.int64))
    payload = ser.to_bytes()
    manifest = build_manifest(payload, ser.meta)
    writer = store.open_writer(manifest)
    assert writer.missing_blocks() == list(range(len(manifest.blocks)))
    with pytest.raises(BlockVerificationError):
        writer.write_block(1, b"\x00" * manifest.sizes[1])
    for i in range(len(manifest.blocks)):
        start, end = manifest.block_range(i)
        assert writer.write_block(i, payload[start:end])
    assert writer.complete and writer.seal() == manifest.root
    np.testing.assert_array_equal(store.get(manifest.root), np.arange(3 * MB // 8, dtype=np.int64))


def test_corrupt_sealed_file_and_missing_cid(make_store):
    store = make_store()
    missing = Cid.of(b"never stored")
    with pytest.raises(ObjectNotFound):
        store.get(missing)
    with pytest.raises(ObjectNotFound):
        store.pin(missing)
    cid = store.put(b"x" * 5000)
    store.delete(cid)
    assert not store.contains(cid) and store.stats()["used"] == 0


def test_default_stores_of_dead_processes_are_removed():
    import subprocess
    import sys

    child = subprocess.run(
        [
            sys.executable,
            "-c",
            "from latticaray.objectstore.store import LocalStore; "
            "s = LocalStore(capacity_bytes=1 << 20); s.put(b'x' * 1000); print(s.root, s.spill_dir)",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    leaked_root, leaked_spill = child.stdout.split()
    assert os.path.isdir(leaked_root) and os.path.isdir(leaked_spill)
    store = LocalStore(capacity_bytes=1 << 20)
    try:
        assert not os.path.exists(leaked_root) and not os.path.exists(leaked_spill)
    finally:
        store.destroy()


@pytest.mark.parametrize(
    "value",
    [
        np.random.default_rng(4).standard_normal(3 * MB // 8 + 17),  # Arrow tensor
        {
            "w": np.random.default_rng(5).standard_normal(2 * MB // 8 + 5),
            "k": "v",
        },  # pickle-5 buffers
    ],
    ids=["tensor", "pickle5"],
)
def test_hashing_from_source_buffers_gives_the_plain_cid(make_store, value):
    store = make_store()
    ser = serialize(value)
    assert ser.segments, "large buffers should be hashed from the source while writing"
    expected = build_manifest(ser.to_bytes(), ser.meta, store.chunk_size).root
    assert store.put(value) == expected


def test_a_broken_segment_promise_falls_back_to_hashing_the_file(make_store):
    store = make_store()
    ser = serialize(np.arange(3 * MB // 8, dtype=np.int64))
    offset, source = ser.segments[0]
    ser.segments = [(offset, memoryview(bytes(source.nbytes)))]  # lies: zeros, not the data
    expected = build_manifest(
        serialize(np.arange(3 * MB // 8, dtype=np.int64)).to_bytes(), ser.meta
    ).root
    assert store.put_serialized(ser) == expected


def _child_puts(root, seed, results):
    client = LocalStore.attach(root)
    cids = [str(client.put(_blob(seed * 10 + i))) for i in range(4)]
    cids.append(str(client.put(_blob(999))))  # the same content from every process
    results.put(cids)


def test_processes_sharing_a_small_store_keep_its_budget_and_accounting(make_store):
    store = make_store(capacity_bytes=6 * MB, spill_capacity_bytes=4 * MB)
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    children = [
        ctx.Process(target=_child_puts, args=(store.root, seed, results)) for seed in range(3)
    ]
    for child in children:
        child.start()
    try:
        lists = [results.get(timeout=90) for _ in children]
    finally:
        for child in children:
            child.join(timeout=30)
            if child.is_alive():  # pragma: no cover
                child.kill()
    assert len({cids[-1] for cids in lists}) == 1
    stats = store.stats()
    on_disk = sum(e.stat().st_size for e in os.scandir(os.path.join(store.root, "objects")))
    spilled = sum(e.stat().st_size for e in os.scandir(store.spill_dir) if e.is_file())
    assert stats["used"] == on_disk <= store.capacity
    assert stats["spill_used"] == spilled <= store.spill_capacity
    assert stats["reserved"] == 0 and os.listdir(os.path.join(store.root, "tmp")) == []
