"""The model-distribution example: a checkpoint by CID to several peers, verified, zero-copy."""

from __future__ import annotations

import checkpoint
import numpy as np
import pytest
from exampleutil import run_example


@pytest.mark.parametrize("size", [400_000, 8_000_000, 200_000_000])
def test_checkpoint_shapes_and_size(size):
    ckpt = checkpoint.make_checkpoint(size)
    total = sum(t.nbytes for t in ckpt.values())
    assert 0.85 * size < total <= size
    assert {t.dtype for t in ckpt.values()} == {np.dtype(np.float16)}
    assert "layers.0.mlp.up" in ckpt and ckpt["embed"].ndim == 2


def test_peers_fetch_by_cid_verify_and_load_zero_copy():
    report = run_example("model_distribution", "--size-mb", "24", "--peers", "3", "--no-bars")
    one, many = report["runs"]
    assert one["peers"] == 1 and many["peers"] == 3
    for run in (one, many):
        assert run["probe_ok"] and run["verified"], run
        assert run["zero_copy_share"] > 0.95, run  # all but the ~0.5 MB embedding: views
    assert len(many["nodes"]) == 3 and one["nodes"][0] not in many["nodes"]
    assert report["cid"].startswith("baf") and report["bytes"] > 12_000_000


def test_a_tensor_that_differs_from_the_manifest_is_refused(embedded):
    lattica = embedded
    ckpt = checkpoint.make_checkpoint(400_000)
    _, keep = checkpoint.publish(ckpt)
    manifest = lattica.get(keep[-1])
    name = next(iter(manifest["tensors"]))
    manifest["tensors"][name]["sha256"] = "0" * 64  # a manifest that lies about one tensor
    bad = lattica.put(manifest)
    peer = checkpoint.Peer.remote()
    with pytest.raises(ValueError, match=f"{name}: content differs"):
        for ref in peer.fetch.remote(bad.cid):
            lattica.get(ref)
    lattica.kill(peer)
