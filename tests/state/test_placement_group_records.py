"""The placement_groups collection: owner-only records that merge everywhere, checked fields."""

from __future__ import annotations

import random

import pytest

from latticaray.state import StateCore
from latticaray.state.errors import StateError
from latticaray.state.placement_groups import PLACEMENT_GROUPS, PlacementGroups
from latticaray.state.simulation import deterministic_key

NOW = 1_700_000_000.0


def cores(n):
    out = []
    for i in range(n):
        core = StateCore(deterministic_key(7, i), wall_clock=lambda: NOW, rng=random.Random(i))
        out.append((core, PlacementGroups(core.replica)))
    return out


def test_owner_writes_and_every_node_reads_the_same_record():
    (a, pa), (b, pb) = cores(2)
    pa.put(
        "pg1",
        name="shards",
        strategy="STRICT_SPREAD",
        bundles=[{"CPU": 1, "GPU": 1}, {"CPU": 1, "GPU": 1}],
        state="created",
        nodes=[str(a.peer_id), str(b.peer_id)],
    )
    report = b.store.merge(list(a.store.atoms()), NOW)
    assert not report.rejected
    record = pb.get("pg1")
    assert record is not None and record.owner == a.peer_id
    assert record.state == "created" and record.nodes == (str(a.peer_id), str(b.peer_id))
    assert [r.group_id for r in pb.owned_by(a.peer_id)] == ["pg1"]
    seen = []
    pb.watch(lambda gid, rec: seen.append((gid, rec and rec.state)))
    pa.put(
        "pg1",
        name="shards",
        strategy="STRICT_SPREAD",
        bundles=[{"CPU": 1}] * 2,
        state="removed",
        nodes=["", ""],
    )
    b.store.merge(list(a.store.atoms()), NOW)
    assert seen == [("pg1", "removed")]


def test_a_peer_cannot_write_another_owners_group_and_bad_values_are_refused():
    (a, pa), (b, _pb) = cores(2)
    with pytest.raises(StateError):
        a.replica.write(PLACEMENT_GROUPS, "pg", str(b.peer_id), {"name": "x"})
    with pytest.raises(StateError, match="strategy"):
        pa.put("pg", name="x", strategy="LOOSE", bundles=[{"CPU": 1}], state="pending", nodes=[""])
    with pytest.raises(StateError, match="one node"):
        pa.put("pg", name="x", strategy="PACK", bundles=[{"CPU": 1}], state="pending", nodes=[])
    with pytest.raises(StateError):
        pa.put("pg", name="x", strategy="PACK", bundles=[{"CPU": -1}], state="pending", nodes=[""])
