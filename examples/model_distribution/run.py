"""Model distribution by CID: a checkpoint put once, fetched by many peers at once.

The seed (this driver) makes a checkpoint (a dict of float16 tensors), puts it in the object
store and shares one string: its manifest's CID. Then 1 peer, and then N peers at once, each an
actor on its own node, fetch it by that CID swarm-style (blocks come from the seed and from the
peers that already have them), show their progress as bars, check every tensor against the
manifest and keep it as zero-copy views into their node's store.

    python examples/model_distribution/run.py --size-mb 256 --peers 4     # local nodes
    python examples/model_distribution/run.py --bootstrap ... --credential ... --size-mb 1000
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]

import checkpoint  # noqa: E402
import localmesh  # noqa: E402
import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

import latticaray as lattica  # noqa: E402

PEER_RESOURCE = "ckpt_peer"
SOLO_RESOURCE = "ckpt_solo"


def fetch_all(peers: list, cid: str, n_tensors: int, show: bool) -> dict:
    """Every peer fetches `cid` at once; one progress bar per peer, fed by its stream. A peer
    raises if a tensor differs from the manifest, so a peer that loaded all `n_tensors` checked
    them all."""
    summaries: list[dict | None] = [None] * len(peers)
    errors: list[str | None] = [None] * len(peers)
    bars = [
        tqdm(
            total=0,
            unit="B",
            unit_scale=True,
            position=i,
            desc=f"peer {i}",
            disable=not show,
            leave=True,
            mininterval=0.5,
        )
        for i in range(len(peers))
    ]
    started = time.perf_counter()
    streams = [p.fetch.remote(cid) for p in peers]

    def follow(i: int) -> None:
        try:
            for ref in streams[i]:
                event = lattica.get(ref)
                if "total" in event:
                    bars[i].reset(total=event["total"])
                elif "bytes" in event and "done" not in event:
                    bars[i].update(event["bytes"])
                else:
                    summaries[i] = event
        except Exception as exc:
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
            errors[i] = f"{type(exc).__name__}: {' / '.join(lines[:1] + lines[-2:])}"

    threads = [threading.Thread(target=follow, args=(i,)) for i in range(len(peers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    for bar in bars:
        bar.close()
    if any(errors):
        raise RuntimeError(f"fetch failed: {errors}")
    return {
        "peers": len(peers),
        "seconds": round(wall, 3),
        "fastest_s": round(min(s["seconds"] for s in summaries), 3),
        "zero_copy_share": round(
            sum(s["zero_copy_bytes"] for s in summaries) / sum(s["bytes"] for s in summaries), 3
        ),
        "verified": all(s["tensors"] == n_tensors for s in summaries),
        "nodes": sorted({s["node"] for s in summaries}),
    }


def tx_bytes(iface: str) -> int:
    """Bytes sent so far on this host's (or network namespace's) interface `iface`."""
    with open(f"/sys/class/net/{iface}/statistics/tx_bytes") as f:
        return int(f.read())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size-mb", type=float, default=1000, help="checkpoint size (MB)")
    parser.add_argument("--peers", type=int, default=8, help="peers fetching at once")
    parser.add_argument(
        "--count-tx",
        metavar="IFACE",
        default=None,
        help="report the bytes this host sent on IFACE during each fetch (the seed's upload; "
        "meaningful where the seed is alone on that interface, e.g. eth0 of its own host)",
    )
    parser.add_argument("--no-bars", action="store_true", help="no progress bars")
    parser.add_argument("--json", action="store_true", help="print the report as one JSON line")
    localmesh.add_mesh_args(parser)
    args = parser.parse_args(argv)
    if args.size_mb <= 0 or args.peers < 1:
        parser.error("--size-mb and --peers must be positive")

    # the 1-peer baseline runs on a node of its own (SOLO_RESOURCE), so that the N peers start
    # from nothing as it did: no node but the seed holds a block of the checkpoint before a run
    if args.bootstrap:
        mesh = localmesh.join(args)
        mesh.wait_for_nodes(PEER_RESOURCE, args.peers, timeout=120)
        mesh.wait_for_nodes(SOLO_RESOURCE, 1, timeout=120)
    else:
        mesh = localmesh.start_local([{SOLO_RESOURCE: 1}] + [{PEER_RESOURCE: 1}] * args.peers)
    report: dict = {"size_mb": args.size_mb, "runs": []}
    try:
        t0 = time.perf_counter()
        ckpt = checkpoint.make_checkpoint(int(args.size_mb * 1e6))
        cid, keep = checkpoint.publish(ckpt)
        size = sum(t.nbytes for t in ckpt.values())
        expected_probe = float(ckpt["embed"][:4, :4].astype(np.float32).sum())
        del ckpt  # the store holds it now
        print(
            f"checkpoint: {len(keep) - 1} tensors, {size / 1e6:.0f} MB, put in "
            f"{time.perf_counter() - t0:.1f} s; share this CID: {cid}"
        )
        report.update(cid=cid, bytes=size, tensors=len(keep) - 1)
        for count, resource in ((1, SOLO_RESOURCE), (args.peers, PEER_RESOURCE)):
            # the nodes again: a long put (a large checkpoint on a busy machine) may have kept
            # this driver from hearing them for a while
            mesh.wait_for_nodes(resource, count, timeout=120)
            peers = [
                checkpoint.Peer.options(resources={resource: 1}).remote() for _ in range(count)
            ]
            lattica.get([p.where.remote() for p in peers], timeout=120)
            tx0 = tx_bytes(args.count_tx) if args.count_tx else None
            print(f"{count} peer(s) fetching at once:")
            run = fetch_all(peers, cid, len(keep) - 1, show=not args.no_bars)
            if tx0 is not None:
                sent = tx_bytes(args.count_tx) - tx0
                run["seed_uploaded_MB"] = round(sent / 1e6, 1)
                run["seed_upload_copies"] = round(sent / size, 2)
            probes = lattica.get([p.probe.remote(cid, "embed") for p in peers], timeout=60)
            run["probe_ok"] = all(p == expected_probe for p in probes)
            report["runs"].append(run)
        report["n_over_1"] = round(report["runs"][1]["seconds"] / report["runs"][0]["seconds"], 2)
    finally:
        mesh.stop()
    for run in report["runs"]:
        seed = (
            f", seed uploaded {run['seed_uploaded_MB']} MB ({run['seed_upload_copies']} copies)"
            if "seed_uploaded_MB" in run
            else ""
        )
        print(
            f"  {run['peers']} peer(s): all done in {run['seconds']:.2f} s (fastest "
            f"{run['fastest_s']:.2f} s), every tensor verified, "
            f"{100 * run['zero_copy_share']:.0f}% of the bytes held "
            f"zero-copy"
            f"{seed}"
        )
    print(f"  {args.peers} peers took {report['n_over_1']}x the time of 1 peer")
    report["machine"] = localmesh.machine_info()
    if args.json:
        print(json.dumps(report))
    return 0 if all(r["verified"] and r["probe_ok"] for r in report["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
