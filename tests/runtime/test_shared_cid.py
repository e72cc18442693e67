"""Objects with equal content share one store file: it lives while any of them refers to it.

Several objects (object ids) of a node may hold equal values: two puts, a put and a task result
that copies it, two results. Their entries name the one store file of that content by different
store names (a put's local name, linked under the CID once it is named by CID; a result that
arrives as the CID itself). Releasing any of them, in either order, leaves the survivor's store
copy in place on this node (read straight from the store, so recovery from another node cannot
mask a deleted file), gettable here and by a task on another node, and still found by its CID
(``cid_index``). A put of the same content made while the first put's CID is being computed
shares the file the same way.
"""

import asyncio
import gc
import itertools
import threading

import numpy as np
import pytest
from meshutil import driver_with_nodes, wait_for

import latticaray as lattica
from latticaray.runtime import api, context, serialization

SIZE = 2 << 20  # over the store threshold: the values live in the node's store
_fills = itertools.count(17)


@pytest.fixture(scope="module")
def mesh():
    with driver_with_nodes(1) as cluster:
        yield cluster


@lattica.remote
def filled(fill):
    return np.full(SIZE, fill, dtype=np.uint8)


@lattica.remote
def digest(array):
    return int(array[0]), int(array[-1]), int(array.nbytes)


def _node():
    return api._runtime.node


def _on_peer(mesh):
    return lattica.NodeAffinitySchedulingStrategy(mesh["nodes"][0].node_id)


def _sealed_data(ref) -> bytes:
    entries = _node().objects.entries
    wait_for(
        lambda: ref.id in entries and entries[ref.id].data is not None, 30, "the object sealed"
    )
    return entries[ref.id].data


def _make(kind: str, fill: int, mesh):
    """An object of ``kind`` holding ``np.full(SIZE, fill)``, read here once (so a result's
    copy is in this node's store, and a put is named by CID by a task on the peer). A result
    made while an equal object is here arrives named by its CID (this node's store has it)."""
    peer = _on_peer(mesh)
    if kind == "put":
        ref = lattica.put(np.full(SIZE, fill, dtype=np.uint8))
        assert lattica.get(digest.options(scheduling_strategy=peer).remote(ref), timeout=60) == (
            fill,
            fill,
            SIZE,
        )
    else:
        ref = filled.options(scheduling_strategy=peer).remote(fill)
    value = lattica.get(ref, timeout=60)
    assert value.nbytes == SIZE and value[0] == fill
    del value
    _sealed_data(ref)
    return ref


def _release(refs: list, index: int) -> None:
    oid = refs[index].id
    refs[index] = None
    gc.collect()
    context.require_core().flush_releases()  # a result's release is batched: post it now
    entries = _node().objects.entries
    wait_for(lambda: oid not in entries, 30, "the released object to leave the table")


def _check_survivor(ref, fill: int, mesh) -> None:
    node = _node()
    data = _sealed_data(ref)
    assert serialization.is_store_ref(data)
    name = serialization.store_name(data)
    assert node.store.contains(name), f"the survivor's store copy {name} was deleted"
    cid = node.store.resolve(name)
    assert node.store.contains(cid)
    assert lattica.get(ref, timeout=60)[0] == fill
    peer = _on_peer(mesh)
    assert lattica.get(digest.options(scheduling_strategy=peer).remote(ref), timeout=60) == (
        fill,
        fill,
        SIZE,
    )
    assert lattica.get(digest.remote(ref), timeout=60) == (fill, fill, SIZE)
    assert ref.cid == str(cid)
    found = node.objects.oid_by_cid(str(cid))
    assert found == ref.id, "cid_index lost the CID while the survivor has it"


@pytest.mark.parametrize("released", [0, 1], ids=["first-released", "second-released"])
@pytest.mark.parametrize(
    "kinds", [("put", "put"), ("put", "result"), ("result", "put"), ("result", "result")]
)
def test_equal_objects_keep_their_store_file(mesh, kinds, released):
    fill = next(_fills)
    refs: list = []
    for kind in kinds:
        refs.append(_make(kind, fill, mesh))
    # both named by CID here (cid_index), as a peer fetching them makes them be
    assert refs[0].cid == refs[1].cid
    _release(refs, released)
    _check_survivor(refs[1 - released], fill, mesh)


def test_equal_put_made_while_the_first_is_hashed(mesh, monkeypatch):
    """The first put's CID is computed (off the loop) while an equal put is made and named by
    CID first: both then link to one file, which the survivor keeps, either released."""
    node = _node()
    objects = node.objects
    for released in (0, 1):
        fill = next(_fills)
        first = lattica.put(np.full(SIZE, fill, dtype=np.uint8))
        first_name = serialization.store_name(_sealed_data(first))
        hashing, go = threading.Event(), threading.Event()
        real = serialization.store_cid

        def held_back(data, first_name=first_name, hashing=hashing, go=go):
            if serialization.store_name(data) == first_name:
                hashing.set()
                assert go.wait(30), "never let go"
            return real(data)

        monkeypatch.setattr(serialization, "store_cid", held_back)

        pending = asyncio.run_coroutine_threadsafe(
            objects.resolve_off_loop(objects.entries[first.id].data), api._runtime.loop
        )
        assert hashing.wait(30), "the first put's hashing never started"
        second = lattica.put(np.full(SIZE, fill, dtype=np.uint8))
        second_cid = second.cid  # hashed and linked while the first is held back
        go.set()
        pending.result(30)
        monkeypatch.setattr(serialization, "store_cid", real)
        assert first.cid == second_cid
        refs = [first, second]
        del first, second
        _release(refs, released)
        _check_survivor(refs[1 - released], fill, mesh)
        refs.clear()
