"""Recycling deleted objects' files as warm spares: safe for live views, budget, crashes, CIDs."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from latticaray.objectstore.errors import ObjectNotFound
from latticaray.objectstore.store import WARM_MIN_BYTES, LocalStore

MB = 1 << 20
N = WARM_MIN_BYTES // 8 + 4096  # float64 elements: a bit over the recycling threshold


def _array(seed: int, n: int = N) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(n)


def _within_budget(store: LocalStore) -> bool:
    stats = store.stats()
    return stats["used"] + stats["reserved"] + stats["warm"] <= store.capacity


def _tmp_names(store: LocalStore) -> list[str]:
    return os.listdir(os.path.join(store.root, "tmp"))


def _fresh(make_store, name: str, **kwargs) -> LocalStore:
    """A store whose first puts take the plain path (no spare made by put itself), so the only
    spares are the recycled ones."""
    store = make_store(name, capacity_bytes=512 * MB, **kwargs)
    store.spares.refill_seconds = store.spares.last_large_put_end = float(
        "inf"
    )  # no idle time for a fresh one
    return store


def test_deleted_file_becomes_the_spare_and_the_next_put_reuses_it(make_store):
    store = _fresh(make_store, "recycle")
    old = _array(1)
    old_cid = store.put(old)
    inode = os.stat(os.path.join(store.root, "objects", str(old_cid))).st_ino
    store.delete(old_cid)
    assert store.wait_warm(60)
    assert store.spares_recycled == 1 and store.spares_made == 0
    assert [os.stat(os.path.join(store.root, "tmp", n)).st_ino for n in _tmp_names(store)] == [
        inode
    ]
    assert _within_budget(store)
    with pytest.raises(ObjectNotFound):
        store.get(old_cid)

    new = _array(2, N - 2000)  # smaller: the old file's tail must be cut off
    new_cid = store.put(new)
    path = os.path.join(store.root, "objects", str(new_cid))
    assert os.stat(path).st_ino == inode  # the recycled pages were used
    assert np.array_equal(store.get(new_cid), new)
    with open(path, "rb") as file:
        data = file.read()
    assert old[-1000:].tobytes() not in data and old[N - 1900 : N - 1700].tobytes() not in data
    assert _within_budget(store)

    # the same value put by a store that never recycled gets the same CID (no stale byte hashed)
    assert make_store("plain", capacity_bytes=512 * MB, warm=False).put(new) == new_cid


def test_a_view_held_in_this_process_is_never_overwritten(make_store):
    store = _fresh(make_store, "own-view")
    old = _array(3)
    cid = store.put(old)
    view = store.get(cid)  # zero-copy: maps the file
    store.delete(cid)
    store.wait_warm(60)
    assert store.spares_recycled == 0  # the lease was refused: plain delete
    assert _tmp_names(store) == []
    store.put(_array(4))
    assert np.array_equal(view, old)
    assert _within_budget(store)


def test_a_view_held_by_another_process_is_never_overwritten(make_store):
    store = _fresh(make_store, "other-view")
    old = _array(5)
    cid = store.put(old)
    reader = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent("""
        import sys, numpy as np
        from latticaray.objectstore.store import LocalStore
        view = LocalStore.attach(sys.argv[1]).get(sys.argv[2])
        before = view.tobytes()
        print("mapped", flush=True)
        sys.stdin.readline()
        print("same" if view.tobytes() == before else "changed", flush=True)
    """),
            store.root,
            str(cid),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert reader.stdout.readline().strip() == "mapped"
        store.delete(cid)
        store.wait_warm(60)
        assert store.spares_recycled == 0
        store.put(_array(6))
        reader.stdin.write("check\n")
        reader.stdin.flush()
        assert reader.stdout.readline().strip() == "same"
    finally:
        reader.kill()
        reader.wait(30)


def test_view_released_before_delete_allows_recycling(make_store):
    store = _fresh(make_store, "released")
    cid = store.put(_array(7))
    view = store.get(cid)
    del view  # last view gone: the mapping closes
    store.delete(cid)
    assert store.wait_warm(60) and store.spares_recycled == 1


def test_budget_blocks_recycling_when_spares_would_pass_an_eighth(make_store):
    store = make_store("tight", capacity_bytes=160 * MB)  # 1/8 = 20 MB < a recycled 32 MB spare
    store.spares.refill_seconds = store.spares.last_large_put_end = float("inf")
    cid = store.put(_array(8))
    store.delete(cid)
    store.wait_warm(60)
    assert store.spares_recycled == 0 and _tmp_names(store) == []
    stats = store.stats()
    assert stats["used"] == 0 and stats["warm"] == 0


def test_off_switches(make_store, monkeypatch):
    for store in (
        _fresh(make_store, "flag", recycle=False),
        _fresh(make_store, "cold", warm=False),
    ):
        cid = store.put(_array(9))
        store.delete(cid)
        store.wait_warm(60)
        assert store.spares_recycled == 0 and _tmp_names(store) == []
    monkeypatch.setenv("LATTICARAY_STORE_RECYCLE", "0")
    assert not _fresh(make_store, "env").recycle_enabled


def test_small_objects_and_evictions_are_not_recycled(make_store):
    store = _fresh(make_store, "small")
    cid = store.put(np.arange(1000))
    store.delete(cid)
    store.wait_warm(60)
    assert store.spares_recycled == 0
    # eviction under pressure frees room; it never turns the victim into a spare
    tiny = make_store("evict", capacity_bytes=30 * MB, spill_capacity_bytes=0)
    first = tiny.put(_array(10))
    tiny.put(_array(11))
    tiny.wait_warm(60)
    assert not tiny.in_memory(first) and tiny.spares_recycled == 0 and _within_budget(tiny)


def test_crash_after_recycling_leaves_no_visible_object_and_is_reclaimed(store_dirs):
    shm, spill = store_dirs
    root, spill_dir = os.path.join(shm, "crash"), os.path.join(spill, "crash")
    LocalStore(root, capacity_bytes=512 * MB, spill_dir=spill_dir)
    child = subprocess.run(
        [
            sys.executable,
            "-c",
            textwrap.dedent("""
        import os, sys, numpy as np
        from latticaray.objectstore.store import LocalStore
        store = LocalStore.attach(sys.argv[1])
        store.spares.refill_seconds = store.spares.last_large_put_end = float("inf")
        cid = store.put(np.random.default_rng(12).standard_normal(int(sys.argv[2])))
        store.delete(cid)
        assert store.wait_warm(60) and store.spares_recycled == 1
        print(cid, flush=True)
        os._exit(0)  # dies holding the spare, without close()
    """),
            root,
            str(N),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert child.returncode == 0, child.stderr
    cid = child.stdout.strip()
    store = LocalStore(root, capacity_bytes=512 * MB, spill_dir=spill_dir)  # recovery
    try:
        assert os.listdir(os.path.join(root, "objects")) == []
        assert os.listdir(os.path.join(root, "tmp")) == []
        assert not store.contains(cid)
        stats = store.stats()
        assert stats["used"] == 0 and stats["warm"] == 0 and stats["reserved"] == 0
    finally:
        store.destroy()


def test_repeated_put_delete_cycles_stay_correct_and_in_budget(make_store):
    store = _fresh(make_store, "cycles")
    previous = None
    for i in range(6):
        value = _array(20 + i, N - 1000 * i)
        cid = store.put(value)
        assert np.array_equal(store.get(cid), value)
        if previous is not None:
            store.delete(previous)
            store.wait_warm(60)
        assert _within_budget(store)
        previous = cid
    assert store.spares_recycled >= 3


def test_a_duplicate_put_recycles_its_temp_file_and_never_touches_the_sealed_object(make_store):
    store = _fresh(make_store, "duplicate")
    value = _array(30)
    cid = store.put(value)
    sealed = os.path.join(store.root, "objects", str(cid))
    inode = os.stat(sealed).st_ino
    assert store.put(value) == cid  # plain path: written to a temp file, then found sealed
    assert store.wait_warm(60) and store.spares_recycled == 1
    assert (
        os.stat(sealed).st_ino == inode
        and len(os.listdir(os.path.join(store.root, "objects"))) == 1
    )
    [spare] = _tmp_names(store)
    spare_inode = os.stat(os.path.join(store.root, "tmp", spare)).st_ino
    other = _array(31)
    other_cid = store.put(other)  # into the recycled duplicate's file
    assert (
        os.stat(os.path.join(store.root, "objects", str(other_cid))).st_ino == spare_inode != inode
    )
    assert np.array_equal(store.get(cid), value) and np.array_equal(store.get(other_cid), other)
    assert _within_budget(store)


def test_a_duplicate_put_into_the_spare_keeps_the_spare(make_store):
    store = _fresh(make_store, "dup-warm")
    value = _array(32)
    cid = store.put(value)
    store.put(value)  # duplicate -> its temp file becomes the spare
    assert store.wait_warm(60)
    spare = _tmp_names(store)
    assert len(spare) == 1
    view = store.get(cid)
    assert store.put(value, pin=True) == cid  # written into the spare, found sealed: spare kept
    assert _tmp_names(store) == spare and store.spares.has_spare
    assert store.is_pinned(cid) and np.array_equal(view, value)
    assert _within_budget(store)
    other = _array(33)
    assert np.array_equal(store.get(store.put(other)), other)  # the kept spare still serves
    assert _tmp_names(store) == [] and np.array_equal(view, value)


def test_a_payload_without_pieces_written_into_a_recycled_file_keeps_no_old_byte(make_store):
    import pyarrow as pa

    store = _fresh(make_store, "arrow")
    store.delete(store.put(_array(40)))  # random bytes left in the recycled file
    assert store.wait_warm(60) and store.spares_recycled == 1
    [spare] = _tmp_names(store)
    table = pa.table({"x": np.arange(WARM_MIN_BYTES // 8 + 1000, dtype=np.int64)})
    cid = store.put(table)
    assert spare not in _tmp_names(store)  # the recycled file took it
    assert store.get(cid).equals(table)
    assert cid == make_store("plain", capacity_bytes=512 * MB, warm=False).put(table)
