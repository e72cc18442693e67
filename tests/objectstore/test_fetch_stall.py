"""A fetch with a stall timeout (FetchSession.stall_timeout): a slow transfer that progresses
goes on past any fixed time, one where nothing arrives for the stall timeout fails."""

import numpy as np
import pytest

from latticaray.objectstore import bitswap as bs
from latticaray.objectstore.errors import ObjectNotFound
from latticaray.objectstore.manifest import build_manifest

from .test_bitswap_core import KB, Provider, _assert_complete, run_fetch


@pytest.fixture
def object_data():
    payload = np.random.default_rng(8).integers(0, 255, 40 * 64 * KB + 5, dtype=np.uint8).tobytes()
    return payload, build_manifest(payload, {"ser": "pickle5"}, chunk_size=64 * KB)


def test_a_slow_transfer_that_progresses_is_not_cut_off(object_data):
    payload, manifest = object_data
    slow = Provider("slow", payload, manifest, latency=0.05, bandwidth=50e3)
    outcome, _ = run_fetch([slow], manifest, timeout=3600.0, stall_timeout=5.0)
    _assert_complete(outcome, payload)
    assert outcome["time"] > 15.0  # three stall timeouts: it kept progressing


def test_a_transfer_whose_only_provider_hangs_fails_after_the_stall_timeout(object_data):
    payload, manifest = object_data
    hung = Provider("hung", payload, manifest, hangs=True)
    outcome, _ = run_fetch([hung], manifest, timeout=3600.0, stall_timeout=5.0)
    result = outcome["result"]
    assert isinstance(result, bs.Failed) and isinstance(result.error, ObjectNotFound)
    assert "without progress" in str(result.error)
    assert outcome["time"] == pytest.approx(5.0, abs=0.2)


def test_a_transfer_stalls_when_its_provider_dies_midway(object_data):
    payload, manifest = object_data
    dying = Provider("dying", payload, manifest, bandwidth=200e3, dies_at=3.0)
    outcome, _ = run_fetch([dying], manifest, timeout=3600.0, stall_timeout=4.0)
    result = outcome["result"]
    assert isinstance(result, bs.Failed)
    assert "blocks missing" in str(result.error) and "without progress" in str(result.error)
    assert 6.5 <= outcome["time"] <= 7.5  # its last block came just before 3 s


def test_without_a_stall_timeout_the_deadline_alone_decides(object_data):
    payload, manifest = object_data
    hung = Provider("hung", payload, manifest, hangs=True)
    outcome, _ = run_fetch([hung], manifest, timeout=12.0)
    assert isinstance(outcome["result"], bs.Failed)
    assert outcome["time"] == pytest.approx(12.0)
