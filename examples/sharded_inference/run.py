"""Sharded inference: a transformer LM split into pipeline stages on different nodes.

Each stage actor holds a contiguous range of layers and their KV caches and runs on its own node
(a STRICT_SPREAD placement group over the nodes offering an `lm_stage` resource). The driver
sends prompts to an LMServer actor, which batches the concurrent requests continuously;
activations flow stage to stage, actor to actor; each request's tokens stream back to the
driver (`num_returns="streaming"`).

It checks that the sharded output is the single-process output (the same token ids), reports
tokens/s and time to first token against the single-process baseline measured in the same run,
and can kill a stage mid-generation (`--kill-stage`) to show the restart and retry.

    python examples/sharded_inference/run.py                    # 2 stages on 2 local nodes
    python examples/sharded_inference/run.py --bench 1,2,4      # tokens/s per stage count
    python examples/sharded_inference/run.py --kill-stage 1     # a stage dies mid-generation
    python examples/sharded_inference/run.py --bootstrap /ip4/.../p2p/... --credential lrc1...
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import threading
import time

# one BLAS thread per process, here and in the node processes started for the example: each
# stage then uses one core, as one stage per machine would, and the baseline the same
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]

import lmserve  # noqa: E402
import localmesh  # noqa: E402
import tinylm  # noqa: E402

import latticaray as lattica  # noqa: E402
from latticaray.util.placement_group import remove_placement_group  # noqa: E402

STAGE_RESOURCE = "lm_stage"


def stream_requests(server, prompts, max_new: int, on_token=None) -> dict:
    """Send every prompt at once, read each token stream on its own thread; the outputs, the
    time to first token of each request, and the overall tokens/s."""
    outs: list[list[int]] = [[] for _ in prompts]
    ttft: list[float] = [0.0] * len(prompts)
    errors: list[BaseException | None] = [None] * len(prompts)
    start = time.perf_counter()
    streams = [server.generate.remote(p, max_new) for p in prompts]

    def read(i: int) -> None:
        try:
            for ref in streams[i]:
                outs[i].append(lattica.get(ref))
                if len(outs[i]) == 1:
                    ttft[i] = time.perf_counter() - start
                if on_token is not None:
                    on_token(i, len(outs[i]))
        except Exception as exc:  # the stream ended with an error: record what the caller sees
            errors[i] = exc

    threads = [threading.Thread(target=read, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    produced = sum(len(o) for o in outs)
    return {"outs": outs, "ttft_s": ttft, "tokens_per_s": produced / wall, "errors": errors}


def summary(name: str, tokens_per_s: float, ttft: list[float]) -> dict:
    return {
        "setup": name,
        "tokens_per_s": round(tokens_per_s, 1),
        "ttft_median_ms": round(1000 * statistics.median(ttft), 1),
        "ttft_max_ms": round(1000 * max(ttft), 1),
    }


def run_sharded(
    cfg, n_stages: int, prompts, max_new: int, repeat: int, kill=None, baseline=None
) -> dict:
    """Deploy `n_stages` stages, run the requests `repeat` times (each run right after a run of
    `baseline()`, the single-process baseline, so both see the same load), maybe kill a stage."""
    # the server (batching, token streams) runs on the driver's node; the stages on theirs
    here = lattica.NodeAffinitySchedulingStrategy(lattica.get_runtime_context().node_id, soft=True)
    groups: list = []
    try:
        server, stages = lmserve.deploy(
            cfg,
            n_stages,
            STAGE_RESOURCE,
            server_options={"scheduling_strategy": here},
            groups=groups,
        )
    except BaseException:
        for group in groups:
            remove_placement_group(group)
        raise
    try:
        placed = lattica.get([s.where.remote() for s in stages], timeout=120)
        stream_requests(server, prompts[:1], 2)  # warm-up: every stage has run once
        runs, local = [], []
        for _ in range(repeat):
            if baseline is not None:
                local.append(baseline())
            runs.append(stream_requests(server, prompts, max_new))
        result = {"runs": runs, "local": local, "placed": placed}
        if kill is not None:
            result["kill"] = kill_stage_mid_generation(server, stages, prompts, max_new, *kill)
        result["server_stats"] = lattica.get(server.stats.remote(), timeout=60)
        return result
    finally:
        for actor in [server, *stages]:
            lattica.kill(actor)
        for group in groups:
            remove_placement_group(group)


def kill_stage_mid_generation(server, stages, prompts, max_new, stage: int, after: int) -> dict:
    """Kill stage `stage` once request 0 has `after` tokens; the restarted stage rebuilds its
    weights, the server prefills the interrupted requests again, and every stream goes on."""
    reached = threading.Event()

    def on_token(i: int, count: int) -> None:
        if i == 0 and count == after:
            reached.set()

    killer_done: dict = {}

    def killer() -> None:
        if reached.wait(120):
            before = lattica.get(stages[stage].where.remote(), timeout=60)
            lattica.kill(stages[stage], no_restart=False)  # as a crash: it may restart
            killer_done["killed_pid"] = before["pid"]
            killer_done["at"] = time.perf_counter()

    thread = threading.Thread(target=killer)
    thread.start()
    run = stream_requests(server, prompts, max_new, on_token)
    thread.join()
    after_info = lattica.get(stages[stage].where.remote(), timeout=120)
    return {
        "outs": run["outs"],
        "errors": [None if e is None else f"{type(e).__name__}: {e}" for e in run["errors"]],
        "killed_pid": killer_done.get("killed_pid"),
        "restarted_pid": after_info["pid"],
        "tokens_per_s": run["tokens_per_s"],
    }


def counts_of(args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[int]:
    """The stage counts to run: --bench's list, else --stages."""
    try:
        counts = [int(c) for c in args.bench.split(",")] if args.bench else [args.stages]
    except ValueError:
        parser.error("--bench takes stage counts separated by commas, e.g. 1,2,4")
    if not counts or min(counts) < 1 or max(counts) > args.layers:
        parser.error(f"stage counts must be between 1 and --layers ({args.layers})")
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--stages", type=int, default=2, help="pipeline stages (default 2)")
    parser.add_argument(
        "--bench", default=None, metavar="LIST", help="stage counts to measure, e.g. 1,2,4"
    )
    parser.add_argument("--requests", type=int, default=8, help="concurrent requests")
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--max-new", type=int, default=32, help="tokens generated per request")
    parser.add_argument("--repeat", type=int, default=2, help="measured runs per setup")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument(
        "--kill-stage", type=int, default=None, metavar="K", help="kill stage K mid-generation"
    )
    parser.add_argument(
        "--kill-after", type=int, default=8, metavar="N", help="... once request 0 has N tokens"
    )
    parser.add_argument("--json", action="store_true", help="print the report as one JSON line")
    localmesh.add_mesh_args(parser)
    args = parser.parse_args(argv)
    if args.kill_stage is not None:
        if not 0 <= args.kill_stage < min(counts_of(args, parser)):
            parser.error("--kill-stage must name a stage of every setup (0 .. stages-1)")
        if not 0 < args.kill_after < args.max_new:
            parser.error("--kill-after must be between 1 and --max-new - 1")

    cfg = tinylm.Config(
        vocab=args.vocab,
        d_model=args.d_model,
        n_layers=args.layers,
        n_heads=max(1, args.d_model // 64),
        d_ff=4 * args.d_model,
    )
    counts = counts_of(args, parser)
    prompts = tinylm.make_prompts(cfg, args.requests, args.prompt_len)

    # the reference: each request alone, in this process
    model = tinylm.TinyLM(cfg)
    reference = [model.generate(p, args.max_new) for p in prompts]
    print(
        f"model: {cfg.n_params() / 1e6:.1f} M parameters, {cfg.n_layers} layers, "
        f"d_model {cfg.d_model}; {args.requests} requests x {args.max_new} tokens"
    )

    if args.bootstrap:
        mesh = localmesh.join(args)
        mesh.wait_for_nodes(STAGE_RESOURCE, max(counts))
    else:
        mesh = localmesh.start_local([{STAGE_RESOURCE: 1}] * max(counts))
    report: dict = {"config": dataclasses.asdict(cfg), "setups": []}
    try:
        for count in counts:
            kill = (args.kill_stage, args.kill_after) if args.kill_stage is not None else None
            mesh.wait_until_free(STAGE_RESOURCE)  # the previous setup's stages are gone
            result = run_sharded(
                cfg, count, prompts, args.max_new, args.repeat, kill,
                baseline=lambda: lmserve.run_local(cfg, prompts, args.max_new),
            )  # fmt: skip
            if any(outs != reference for outs, _ in result["local"]):
                raise AssertionError("the batched single-process run differs from the reference")
            base = max(result["local"], key=lambda r: r[1]["tokens_per_s"])[1]
            best = max(result["runs"], key=lambda r: r["tokens_per_s"])
            exact = all(r["outs"] == reference for r in result["runs"])
            nodes = sorted({p["node"] for p in result["placed"]})
            rows = [
                summary("single process (same batching)", base["tokens_per_s"], base["ttft_s"]),
                summary(
                    f"{count} stage(s) on {len(nodes)} node(s)",
                    best["tokens_per_s"],
                    best["ttft_s"],
                ),
            ]
            entry = {
                "stages": count,
                "nodes": len(nodes),
                "exact": exact,
                "rows": rows,
                "stage_nodes": [p["node"] for p in result["placed"]],
                # every run's tokens/s, baseline and sharded alternating in time
                "baseline_runs": [round(r[1]["tokens_per_s"], 1) for r in result["local"]],
                "sharded_runs": [round(r["tokens_per_s"], 1) for r in result["runs"]],
                "server_stats": result["server_stats"],
            }
            for row in rows:
                print(
                    f"  {row['setup']:<34} {row['tokens_per_s']:>8.1f} tokens/s   "
                    f"time to first token median {row['ttft_median_ms']:.0f} ms, "
                    f"max {row['ttft_max_ms']:.0f} ms"
                )
            print(f"  sharded token ids equal the single-process ones: {exact}")
            stats = result["server_stats"]
            print(
                f"  continuous batching: {stats['steps']} steps, "
                f"{stats['rows'] / max(1, stats['steps']):.1f} requests per step on average"
            )
            if "kill" in result:
                k = result["kill"]
                entry["kill"] = {
                    "stage": args.kill_stage,
                    "after_tokens": args.kill_after,
                    "exact": k["outs"] == reference,
                    "errors": k["errors"],
                    "killed_pid": k["killed_pid"],
                    "restarted_pid": k["restarted_pid"],
                    "recomputes": result["server_stats"]["recomputes"],
                    "failed_steps": result["server_stats"]["failed_steps"],
                    "server_errors": result["server_stats"]["errors"][:4],
                }
                print(
                    f"  stage {args.kill_stage} killed (pid {k['killed_pid']}) after "
                    f"{args.kill_after} tokens; restarted as pid {k['restarted_pid']}; "
                    f"{result['server_stats']['failed_steps']} failed step(s), "
                    f"{result['server_stats']['recomputes']} request(s) prefilled again; "
                    f"outputs still equal: {entry['kill']['exact']}"
                )
            report["setups"].append(entry)
    finally:
        mesh.stop()
    report["machine"] = localmesh.machine_info()
    if args.json:
        print(json.dumps(report))
    ok = all(s["exact"] and s.get("kill", {}).get("exact", True) for s in report["setups"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
