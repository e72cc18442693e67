"""Local puts: sealed under an unguessable local name without hashing, CID computed on demand."""

import multiprocessing
import os

import numpy as np
import pytest

from latticaray.objectstore.cid import BLAKE3, SHA2_256, blake3_available
from latticaray.objectstore.errors import ObjectNotFound
from latticaray.objectstore.fileformat import TornRead, read_local
from latticaray.objectstore.local_names import hash_local_file
from latticaray.objectstore.store import WARM_MIN_BYTES, LocalStore, is_local_name

MB = 1 << 20


def _hashes():
    return [SHA2_256] + ([BLAKE3] if blake3_available() else [])


def _within_budget(store: LocalStore) -> bool:
    stats = store.stats()
    return stats["used"] + stats["reserved"] + stats["warm"] <= store.capacity


def _array(seed: int, n: int = WARM_MIN_BYTES // 8 + 777) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(n)


@pytest.mark.parametrize("hash_code", _hashes())
@pytest.mark.parametrize(
    "value",
    [
        _array(1),  # large: warm/recycled path after the first
        np.arange(1000, dtype=np.int16),  # small: plain path
        {"a": _array(2, 300_000), "b": [1, "x"]},  # pickle-5 with an out-of-band buffer
        b"",
    ],
)
def test_local_put_reads_back_and_resolves_to_the_plain_cid(make_store, hash_code, value):
    plain = make_store("plain", hash_code=hash_code, warm=False)
    local = make_store("local", hash_code=hash_code)
    expected = plain.put(value)
    name = local.put_local(value)
    assert is_local_name(name) and not is_local_name(str(expected))
    assert os.listdir(os.path.join(local.root, "objects")) == []  # nothing hashed yet
    assert local.contains(name) and local.in_memory(name)
    assert local.cid_if_resolved(name) is None
    got = local.get(name)
    if isinstance(value, np.ndarray):
        assert np.array_equal(got, value) and not got.flags.writeable
    elif isinstance(value, dict):
        assert np.array_equal(got["a"], value["a"]) and got["b"] == value["b"]
    else:
        assert got == value
    del got
    assert local.resolve(name) == expected
    assert local.cid_if_resolved(name) == expected
    assert os.listdir(os.path.join(local.root, "objects")) == [str(expected)]
    assert local.manifest(name).root == expected
    obj = local.get_object(expected)
    for i in range(len(obj.manifest.blocks)):  # blocks served to peers verify
        assert obj.manifest.blocks[i].verify(obj.block(i))
    assert _within_budget(local)
    assert (
        local.stats()["used"] == os.stat(os.path.join(local.root, "objects", str(expected))).st_size
    )


def test_the_second_put_of_a_content_is_dropped_when_linked(make_store):
    store = make_store()
    value = _array(3)
    first, second = store.put_local(value), store.put_local(value)
    assert first != second and store.stats()["local"] == 2
    cid = store.resolve(first)
    assert store.resolve(second) == cid
    assert store.stats()["objects"] == 1 and store.stats()["local"] == 0
    assert store.stats()["used"] == os.stat(os.path.join(store.root, "objects", str(cid))).st_size
    store.delete(first)  # the other name still needs it
    assert np.array_equal(store.get(second), value) and store.contains(cid)
    store.delete(second)  # the last name linked to an object it made: gone
    assert not store.contains(cid) and not store.contains(second)
    with pytest.raises(ObjectNotFound):
        store.get(second)
    assert store.stats()["used"] == 0


def test_deleting_a_local_name_keeps_an_object_sealed_before_under_its_cid(make_store):
    store = make_store()
    value = _array(4)
    cid = store.put(value)
    name = store.put_local(value)
    assert store.resolve(name) == cid
    store.delete(name)
    assert np.array_equal(store.get(cid), value)
    assert not store.contains(name)


def test_unresolved_local_object_is_deleted_and_its_room_freed(make_store):
    store = make_store(warm=False)
    name = store.put_local(_array(5))
    assert store.stats()["used"] > 0
    store.delete(name)
    assert store.stats()["used"] == 0 and not store.contains(name)
    assert os.listdir(os.path.join(store.root, "local")) == []


def test_pins_hold_across_linking_and_eviction_resolves_then_spills(make_store):
    store = make_store(capacity_bytes=80 * MB, warm=False)
    values = [_array(10 + i, 3 * MB) for i in range(4)]  # 24 MiB each
    names = [store.put_local(v) for v in values[:2]]
    store.pin(names[0])
    names += [store.put_local(v) for v in values[2:]]  # does not fit: evicts names[1]
    assert _within_budget(store)
    assert store.is_pinned(names[0]) and store.in_memory(names[0])
    assert not store.in_memory(names[1]) and store.is_spilled(names[1])  # spilled under its CID
    assert store.cid_if_resolved(names[1]) is not None
    assert np.array_equal(store.get(names[1]), values[1])  # restored from spill
    cid0 = store.resolve(names[0])
    assert store.is_pinned(cid0) and store.is_pinned(names[0])  # the pin moved to the CID
    store.unpin(names[0])
    assert not store.is_pinned(cid0)
    for name, value in zip(names, values):
        assert np.array_equal(store.get(name), value)
    assert _within_budget(store)


def _child_reads_and_resolves(root: str, name: str, queue) -> None:
    client = LocalStore.attach(root)
    value = client.get(name)
    queue.put((float(value.sum()), str(client.resolve(name))))


def test_another_process_reads_by_local_name_and_can_resolve_it(make_store):
    store = make_store()
    value = _array(6)
    name = store.put_local(value)
    expected = make_store("plain", warm=False).put(value)
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_child_reads_and_resolves, args=(store.root, name, queue))
    child.start()
    try:
        total, cid = queue.get(timeout=120)
    finally:
        child.join(timeout=60)
    assert child.exitcode == 0
    assert total == pytest.approx(float(value.sum())) and cid == str(expected)
    assert store.cid_if_resolved(name) == expected  # seen by this process without hashing
    assert np.array_equal(store.get(name), value)


def test_a_trailer_changed_during_a_read_is_detected(make_store):
    store = make_store(warm=False)
    name = store.put_local(_array(7, 1000))
    path = os.path.join(store.root, "local", name)
    read_local(path)
    with open(path, "r+b") as file:  # what linking does first: void the local magic
        file.seek(-8, os.SEEK_END)
        file.write(bytes(8))
    with pytest.raises(TornRead):
        read_local(path)


def test_local_objects_survive_recovery_and_count_in_the_budget(make_store, store_dirs):
    store = make_store("node")
    name = store.put_local(_array(8))
    used = store.stats()["used"]
    again = LocalStore(store.root, capacity_bytes=store.capacity, spill_dir=store.spill_dir)
    assert again.stats()["used"] == used and again.stats()["local"] == 1
    cid = again.resolve(name)
    again2 = LocalStore(store.root, capacity_bytes=store.capacity, spill_dir=store.spill_dir)
    assert again2.cid_if_resolved(name) == cid
    again2.delete(name)  # the link count was rebuilt from the directory
    assert not again2.contains(cid)
    again2.close()
    again.close()


# --- gifts: a deleted local object's file goes back to the process that wrote it ---------------


def _gifts(store: LocalStore) -> list[str]:
    return [n for n in os.listdir(os.path.join(store.root, "tmp")) if n.endswith("-gift-warm")]


def _fresh_local(make_store, name: str = "gift", **kwargs) -> LocalStore:
    store = make_store(name, capacity_bytes=512 * MB, **kwargs)
    store.spares.refill_seconds = store.spares.last_large_put_end = float("inf")  # no fresh spares
    return store


def test_a_deleted_local_object_comes_back_as_a_spare_through_the_kept_mapping(make_store):
    store = _fresh_local(make_store)
    old = _array(20, WARM_MIN_BYTES // 8 + 20_000)
    name = store.put_local(old)  # plain path (no spare yet): not mapped here
    inode = os.stat(os.path.join(store.root, "local", name)).st_ino
    store.delete(name)
    assert [os.stat(os.path.join(store.root, "tmp", n)).st_ino for n in _gifts(store)] == [inode]
    assert _within_budget(store) and store.stats()["warm"] > 0 and store.stats()["used"] == 0
    new = _array(21, old.size - 3000)
    second = store.put_local(new)  # into the given-back file, mapped anew
    assert store.gifts_taken == 1 and store.gifts_reused_mapping == 0
    path = os.path.join(store.root, "local", second)
    assert os.stat(path).st_ino == inode and _gifts(store) == []
    with open(path, "rb") as file:
        data = file.read()
    assert old[-2000:].tobytes() not in data  # nothing of the old object survives
    store.delete(second)
    third = store.put_local(old)  # and again: this time through the mapping kept from the put
    assert store.gifts_taken == 2 and store.gifts_reused_mapping == 1
    assert os.stat(os.path.join(store.root, "local", third)).st_ino == inode
    assert np.array_equal(store.get(third), old)
    assert store.resolve(third) == make_store("plain", warm=False).put(old)
    assert _within_budget(store)


def test_a_view_held_here_makes_the_gift_refused_and_keeps_its_bytes(make_store):
    store = _fresh_local(make_store)
    old = _array(22)
    name = store.put_local(old)
    view = store.get(name)
    store.delete(name)
    assert len(_gifts(store)) == 1
    store.put_local(_array(23))
    assert store.gifts_taken == 0 and _gifts(store) == []  # the lease was refused: unlinked
    assert np.array_equal(view, old)
    assert _within_budget(store)


def test_an_idle_gift_gives_way_to_a_newer_one_when_both_pass_the_cap(make_store):
    # cap on given-back files: capacity // 8 = 40 MiB, room for one 32 MiB gift only
    store = make_store("cap", capacity_bytes=320 * MB)
    store.spares.refill_seconds = store.spares.last_large_put_end = float("inf")
    first = store.put_local(_array(24))
    second = store.put_local(_array(25))
    second_inode = os.stat(os.path.join(store.root, "local", second)).st_ino
    store.delete(first)
    assert len(_gifts(store)) == 1
    store.delete(second)  # the older gift is dropped rather than this file unlinked
    gifts = _gifts(store)
    assert [os.stat(os.path.join(store.root, "tmp", n)).st_ino for n in gifts] == [second_inode]
    assert store.gifts.gifts_dropped == 1
    assert store.stats()["warm"] <= store.capacity // 8 and _within_budget(store)
    third = store.put_local(_array(26))  # takes the newer gift
    assert store.gifts_taken == 1 and _gifts(store) == []
    assert os.stat(os.path.join(store.root, "local", third)).st_ino == second_inode
    assert np.array_equal(store.get(third), _array(26))


def _writer(root: str, conn) -> None:
    client = LocalStore.attach(root)
    client.spares.refill_seconds = client.spares.last_large_put_end = float("inf")
    conn.send(client.put_local(_array(30)))
    conn.recv()  # the parent deleted it
    name = client.put_local(_array(31))
    conn.send((name, client.gifts_taken, client.gifts_reused_mapping))
    conn.recv()
    client.close()


def test_the_file_goes_back_to_the_writer_in_another_process(make_store):
    store = _fresh_local(make_store)
    ctx = multiprocessing.get_context("spawn")
    conn, child_conn = ctx.Pipe()
    child = ctx.Process(target=_writer, args=(store.root, conn))
    child.start()
    try:
        assert child_conn.poll(120)
        first = child_conn.recv()
        store.delete(first)
        assert len(_gifts(store)) == 1 and _gifts(store)[0].startswith(f"{child.pid}-")
        child_conn.send("deleted")
        assert child_conn.poll(120)
        second, taken, reused = child_conn.recv()
        assert (taken, reused) == (1, 0)
        assert np.array_equal(store.get(second), _array(31))
        child_conn.send("done")
    finally:
        child.join(timeout=60)
    assert child.exitcode == 0
    assert _gifts(store) == [] and _within_budget(store)


def test_no_gift_when_recycling_is_off_or_the_writer_is_gone(make_store, monkeypatch):
    monkeypatch.setenv("LATTICARAY_STORE_RECYCLE", "0")
    off = _fresh_local(make_store, "off")
    off.delete(off.put_local(_array(40)))
    assert _gifts(off) == [] and off.stats()["used"] == 0 and off.stats()["warm"] == 0
    monkeypatch.delenv("LATTICARAY_STORE_RECYCLE")
    nowarm = _fresh_local(make_store, "nowarm", warm=False)
    nowarm.delete(nowarm.put_local(_array(41)))
    assert _gifts(nowarm) == [] and nowarm.stats()["used"] == 0


def test_a_put_waits_briefly_for_a_file_it_expects_back(make_store):
    import threading

    store = _fresh_local(make_store)
    assert not store.gifts.await_expected(8 << 30)  # nothing expected: no wait at all
    name = store.put_local(_array(50))
    store.expect_back(name)
    deleter = LocalStore.attach(store.root)  # as the node process would
    timer = threading.Timer(0.01, deleter.delete, [name])
    timer.start()
    try:
        assert store.gifts.await_expected(8 << 30)  # up to 250 ms: the delete comes within it
    finally:
        timer.join()
    assert len(_gifts(store)) == 1
    store.expect_back(store.put_local(_array(51)))  # takes the gift; expects its own back
    assert store.gifts_taken == 1
    assert not store.gifts.await_expected(WARM_MIN_BYTES)  # never deleted: gives up after ~2 ms


def test_runtime_store_refs_name_local_puts_and_resolve_when_they_leave(make_store):
    from latticaray.runtime import serialization

    store = make_store()
    value = _array(60)
    previous = serialization._store
    serialization.set_store(store)
    try:
        data = serialization.serialize(value)
        assert serialization.is_store_ref(data)
        name = serialization.store_name(data)
        assert is_local_name(name) and store.cid_if_resolved(name) is None
        assert np.array_equal(serialization.deserialize(data), value)
        assert store.cid_if_resolved(name) is None  # reading it did not hash it
        expected = str(make_store("plain", warm=False).put(value))
        out = serialization.portable(data)
        assert serialization.store_name(out) == expected == serialization.cid_of(data)
        assert serialization.portable(out) is out
        assert np.array_equal(serialization.deserialize(out), value)
    finally:
        serialization.set_store(previous)


@pytest.mark.parametrize("stage", ["magic voided", "manifest written", "linked, not yet a symlink"])
def test_a_link_cut_short_by_a_crash_is_finished_or_undone_by_recovery(make_store, stage):
    from latticaray.objectstore.fileformat import SEALED_MAGIC, TRAILER, sealed_size

    store = make_store("node", warm=False)
    value = _array(70)
    name = store.put_local(value)
    path = os.path.join(store.root, "local", name)
    manifest, _ = hash_local_file(path)
    size = os.stat(path).st_size
    with open(path, "r+b") as file:  # the steps of _link_local, up to the crash
        file.seek(size - 8)
        file.write(bytes(8))
        if stage != "magic voided":
            file.seek(manifest.size)
            file.write(manifest.encoded + TRAILER.pack(len(manifest.encoded), SEALED_MAGIC))
            file.truncate(sealed_size(manifest))
    if stage == "linked, not yet a symlink":
        os.link(path, os.path.join(store.root, "objects", str(manifest.root)))
    again = LocalStore(store.root, capacity_bytes=store.capacity, spill_dir=store.spill_dir)
    assert np.array_equal(again.get(name), value)
    assert again.resolve(name) == manifest.root
    stats = again.stats()
    assert stats["objects"] == 1 and stats["used"] == sealed_size(manifest)
    again.delete(name)
    assert again.stats()["used"] == 0 and not again.contains(manifest.root)
    again.close()


def test_a_resolved_local_object_goes_back_to_its_writer_with_its_last_name(make_store):
    store = _fresh_local(make_store)
    n = WARM_MIN_BYTES // 8 + 20_000
    store.delete(store.put_local(_array(80, n)))  # plain path; its file comes back
    first = store.put_local(_array(81, n))  # into that file, mapped here and kept
    inode = os.stat(os.path.join(store.root, "local", first)).st_ino
    cid = store.resolve(first)
    assert os.stat(os.path.join(store.root, "objects", str(cid))).st_ino == inode
    store.delete(first)  # the last name of an object its link made: back to the writer
    assert not store.contains(cid) and len(_gifts(store)) == 1
    assert store.stats()["used"] == 0 and _within_budget(store)
    reused = store.gifts_reused_mapping
    again = store.put_local(_array(82, n))
    assert store.gifts_reused_mapping == reused + 1
    assert os.stat(os.path.join(store.root, "local", again)).st_ino == inode
    assert np.array_equal(store.get(again), _array(82, n))


def test_an_attached_process_hashes_with_the_stores_multihash(make_store):
    # a value put by any process of a store gets the CID the store's own put gives it
    store = make_store(hash_code=BLAKE3)
    client = LocalStore.attach(store.root)
    assert client.hash_code == BLAKE3
    value = _array(7)
    assert client.resolve(client.put_local(value)) == store.put(value)


@pytest.mark.parametrize("resolved_local", [False, True])
def test_an_object_linked_into_another_store_is_shared_and_never_recycled(
    make_store, resolved_local
):
    # a node on the same host links a peer's sealed object into its store (no copy): neither
    # store may reuse that file for a later put while the other still names it
    a, b = make_store("a"), make_store("b")
    value = _array(8)
    if resolved_local:
        name = a.put_local(value)
        cid = a.resolve(name)
    else:
        cid = a.put(value)
    assert b.link_from(a, cid) == a.manifest(cid).size
    assert os.stat(b.paths.sealed(str(cid))).st_nlink == 2
    assert b.link_from(a, cid) == 0  # held already
    a.delete(name if resolved_local else cid)
    for seed in range(3):  # puts that would write into a recycled or given-back file
        a.put_local(_array(20 + seed))
    assert np.array_equal(b.get(cid), value)
    b.delete(cid)
    assert not b.contains(cid)


def test_without_a_link_a_deleted_objects_file_is_recycled(make_store):
    # the contrast: the same steps with no link reuse the file
    a = make_store("a")
    cid = a.put(_array(8))
    a.delete(cid)
    a.put_local(_array(20))
    assert a.spares_recycled + a.gifts_taken >= 1
