"""A model checkpoint shared by CID: made and put once by a seed, fetched by many peers at once.

* `make_checkpoint`: a dict of named float16 tensors shaped like a transformer's (embedding,
  per-layer attention and MLP matrices), `total_bytes` in all, from a seed (nothing downloaded).
* `publish`: puts every tensor in the object store and then a manifest (name -> CID, shape,
  dtype, sha256); the manifest's CID is the one string peers need. The refs are returned: the
  seed keeps them, which keeps the objects alive.
* `Peer`: an actor that fetches a checkpoint by its manifest CID, streaming its progress (bytes
  so far) back to the caller, and keeps the tensors as zero-copy views into its node's store.

Verification: a peer gets the manifest by CID, and every block of every tensor arrives under
the CID the manifest names; the store checks each block's hash before it is used, so what a peer
holds is what the seed put. The peer also compares the sha256 of each tensor it loaded with the
manifest's, an end-to-end check that does not depend on the store.
"""

from __future__ import annotations

import hashlib
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import cloudpickle
import numpy as np

import latticaray as lattica

# Worker processes on other nodes cannot import this folder by name: ship this module by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def make_checkpoint(total_bytes: int, d_model: int = 2048, seed: int = 0) -> dict[str, np.ndarray]:
    """An embedding and layers of 4 attention and 2 MLP (d x 4d) float16 matrices, as many
    layers as fit `total_bytes` at width about `d_model`, the width then fitted so that the
    whole is just under `total_bytes`."""
    rng = np.random.default_rng(seed)
    n_layers = max(1, round(total_bytes / (24 * d_model**2)))  # a layer: 12 d^2 float16s
    # 2 bytes x (embedding d/4 x d + 12 d^2 per layer) <= total_bytes
    d = max(8, int((total_bytes / (2 * (12 * n_layers + 0.25))) ** 0.5) // 4 * 4)
    shapes: list[tuple[str, tuple[int, int]]] = [("embed", (d // 4, d))]
    for layer in range(n_layers):
        shapes += [(f"layers.{layer}.attn.{m}", (d, d)) for m in ("wq", "wk", "wv", "wo")]
        shapes += [(f"layers.{layer}.mlp.up", (d, 4 * d)), (f"layers.{layer}.mlp.down", (4 * d, d))]
    return {
        name: rng.standard_normal(shape, dtype=np.float32).astype(np.float16)
        for name, shape in shapes
    }


def publish(checkpoint: dict[str, np.ndarray]) -> tuple[str, list]:
    """Put each tensor and the manifest; (manifest CID, refs to keep alive)."""
    refs, entries = [], {}
    for name, tensor in checkpoint.items():
        ref = lattica.put(tensor)
        refs.append(ref)
        entries[name] = {
            "cid": ref.cid,
            "shape": list(tensor.shape),
            "dtype": str(tensor.dtype),
            "nbytes": tensor.nbytes,
            "sha256": hashlib.sha256(tensor.data).hexdigest(),
        }
    manifest = lattica.put({"format": "latticaray-checkpoint/1", "tensors": entries})
    refs.append(manifest)
    return manifest.cid, refs


@lattica.remote
class Peer:
    """Fetches checkpoints by CID and holds them (as a serving replica would)."""

    def __init__(self):
        self.checkpoints: dict[str, dict[str, np.ndarray]] = {}

    def fetch(self, manifest_cid: str, parallel: int = 1):
        """Streams {"bytes": n} per tensor as it arrives, then a summary of the load."""
        started = time.perf_counter()
        manifest = lattica.get(manifest_cid)
        entries = manifest["tensors"]
        yield {"total": sum(e["nbytes"] for e in entries.values())}

        def load(name: str):
            entry = entries[name]
            tensor = lattica.get(entry["cid"])  # a read-only view into this node's store
            if list(tensor.shape) != entry["shape"] or str(tensor.dtype) != entry["dtype"]:
                raise ValueError(f"{name}: shape or dtype differ from the manifest")
            if hashlib.sha256(tensor.data).hexdigest() != entry["sha256"]:
                raise ValueError(f"{name}: content differs from the manifest's sha256")
            return name, tensor

        tensors = {}
        with ThreadPoolExecutor(parallel) as pool:
            for name, tensor in pool.map(load, entries):
                tensors[name] = tensor
                yield {"bytes": tensor.nbytes}
        self.checkpoints[manifest_cid] = tensors
        yield {
            "done": True,
            "seconds": time.perf_counter() - started,
            "node": lattica.get_runtime_context().node_id,
            "tensors": len(tensors),
            "bytes": sum(t.nbytes for t in tensors.values()),
            # zero-copy: read-only numpy views over the store's shared memory, not copies (the
            # store hands small objects, up to about 1 MB, out as copies)
            "zero_copy_bytes": sum(
                t.nbytes for t in tensors.values() if not t.flags.owndata and not t.flags.writeable
            ),
        }

    def probe(self, manifest_cid: str, name: str) -> float:
        """A number computed from a held tensor (the loaded model in use)."""
        return float(self.checkpoints[manifest_cid][name][:4, :4].astype(np.float32).sum())

    def where(self) -> str:
        return lattica.get_runtime_context().node_id
