"""Snapshots: round trip, tampering rejected per atom, stale snapshots not replayed."""

from __future__ import annotations

import pytest

from latticaray.state import SnapshotError, StateCore
from latticaray.state.persistence import SNAPSHOT_MAGIC, load_snapshot, save_snapshot
from latticaray.state.simulation import deterministic_key

NOW = 1_700_000_000.0


def make(clock=lambda: NOW, tombstone_ttl=3600.0) -> StateCore:
    core = StateCore(deterministic_key(5, 0), wall_clock=clock, tombstone_ttl=tombstone_ttl)
    core.lww_map("kv")
    return core


def test_round_trip_restores_state_digest_and_clock(tmp_path):
    core = make()
    for i in range(10):
        core.lww_map("kv").set(f"k{i}", {"n": i})
    core.actors.claim("svc", "actor-1")
    path = tmp_path / "s.snap"
    save_snapshot(path, core.store, NOW)
    again = make()
    result = load_snapshot(path, again.store, NOW + 5)
    assert result.loaded == 11 and result.rejected == 0
    assert again.store.node(0, 0) == core.store.node(0, 0)
    assert again.store.clock.last >= core.store.clock.last
    assert again.actors.get("svc").actor_id == "actor-1"


def test_tampered_atoms_are_rejected_and_garbage_raises(tmp_path):
    core = make()
    core.lww_map("kv").set("k", "honest-value")
    path = tmp_path / "s.snap"
    save_snapshot(path, core.store, NOW)
    data = path.read_bytes().replace(b"honest-value", b"forged-value")
    path.write_bytes(data)
    again = make()
    result = load_snapshot(path, again.store, NOW)
    assert result.loaded == 0 and result.rejected == 1 and len(again.store) == 0
    path.write_bytes(b"not a snapshot")
    with pytest.raises(SnapshotError):
        load_snapshot(path, again.store, NOW)
    path.write_bytes(SNAPSHOT_MAGIC + b"\xc1\xc1")
    with pytest.raises(SnapshotError):
        load_snapshot(path, again.store, NOW)
    assert load_snapshot(tmp_path / "missing", again.store, NOW).skipped_reason == "no snapshot"


def test_snapshot_older_than_tombstone_ttl_is_not_replayed(tmp_path):
    core = make()
    core.lww_map("kv").set("k", 1)
    path = tmp_path / "s.snap"
    save_snapshot(path, core.store, NOW)
    again = make()
    result = load_snapshot(path, again.store, NOW + 7200)
    assert result.loaded == 0 and "TTL" in result.skipped_reason and len(again.store) == 0
