"""Federated averaging: clients on their own nodes train on private, non-IID shards of the
digits data; a coordinator actor averages their models, round by round.

Each client actor holds one shard (its data never leaves it) and trains softmax regression from
the global weights the coordinator put in the object store for the round; the coordinator waits
for updates until the round's deadline and averages the ones that arrived (weighted by sample
count), so a client that stalls or crashes mid-round does not stall the round. The driver
streams one report per round (`Coordinator.fit` is a streaming generator) and trains the same
model centrally on the same data in this process for comparison.

    python examples/federated_averaging/run.py                         # 8 clients on 2 local nodes
    python examples/federated_averaging/run.py --stall-client 3 --crash-client 5
    python examples/federated_averaging/run.py --bootstrap /ip4/.../p2p/... --credential lrc1...
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]

import fedavg  # noqa: E402
import localmesh  # noqa: E402
import sklearn  # noqa: E402

import latticaray as lattica  # noqa: E402

CLIENT_RESOURCE = "fl_client"


def centralized(x, y, x_test, y_test, rounds: int, epochs: int, lr: float, batch: int):
    """The same model and optimizer on all the training data in one place: accuracy after each
    `epochs` epochs (one per FedAvg round, the same number of passes over every sample)."""
    params = fedavg.Model.init()
    curve = []
    for r in range(rounds):
        params, _ = fedavg.Model.sgd(params, x, y, epochs, lr, batch, seed=r)
        curve.append(fedavg.Model.accuracy(params, x_test, y_test))
    return curve


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument(
        "--nodes",
        type=int,
        default=2,
        help="local node processes to start (joining: nodes offering fl_client to wait for)",
    )
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--local-epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=0.3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument(
        "--alpha",
        type=float,
        default=0.5,
        help="Dirichlet concentration of the label skew (smaller: less IID)",
    )
    parser.add_argument("--round-timeout", type=float, default=10.0, metavar="SECONDS")
    parser.add_argument(
        "--stall-client",
        type=int,
        default=None,
        metavar="I",
        help="client I goes quiet in round --fault-round for 2x the timeout",
    )
    parser.add_argument(
        "--crash-client",
        type=int,
        default=None,
        metavar="I",
        help="client I's process dies mid-round in round --fault-round + 1",
    )
    parser.add_argument("--fault-round", type=int, default=2)
    parser.add_argument("--json", action="store_true", help="print the report as one JSON line")
    localmesh.add_mesh_args(parser)
    args = parser.parse_args(argv)
    if args.clients < 1 or args.rounds < 1 or args.nodes < 1 or args.round_timeout <= 0:
        parser.error("--clients, --rounds, --nodes and --round-timeout must be positive")
    for flag, client in (
        ("--stall-client", args.stall_client),
        ("--crash-client", args.crash_client),
    ):
        if client is not None and not 0 <= client < args.clients:
            parser.error(f"{flag} must be a client index, 0 .. {args.clients - 1}")

    x_train, x_test, y_train, y_test = fedavg.load_data()
    shards = fedavg.split_non_iid(y_train, args.clients, args.alpha)
    central = centralized(
        x_train, y_train, x_test, y_test, args.rounds, args.local_epochs, args.lr, args.batch
    )

    if args.bootstrap:
        mesh = localmesh.join(args)
        mesh.wait_for_nodes(CLIENT_RESOURCE, args.nodes)
    else:
        per_node = -(-args.clients // args.nodes)
        mesh = localmesh.start_local([{CLIENT_RESOURCE: per_node}] * args.nodes)
    rounds = []
    try:
        clients = []
        for i, shard in enumerate(shards):
            faults = {}
            if i == args.stall_client:
                faults["stall"] = (args.fault_round, 2 * args.round_timeout)
            if i == args.crash_client:
                faults["crash"] = args.fault_round + 1
            clients.append(
                fedavg.Client.options(resources={CLIENT_RESOURCE: 1}, max_restarts=1).remote(
                    i, x_train[shard], y_train[shard], faults
                )
            )
        skew = lattica.get([c.label_counts.remote() for c in clients], timeout=120)
        print(f"{args.clients} clients, labels per client (non-IID, alpha {args.alpha}):")
        for i, counts in enumerate(skew):
            print(f"  client {i}: {counts}")
        me = lattica.get_runtime_context().node_id
        coordinator = fedavg.Coordinator.options(
            scheduling_strategy=lattica.NodeAffinitySchedulingStrategy(me, soft=True)
        ).remote(clients, x_test, y_test)
        print(" round  federated  centralized  clients  timed out  failed    KB moved   seconds")
        started = time.perf_counter()
        stream = coordinator.fit.remote(
            args.rounds, args.local_epochs, args.lr, args.batch, args.round_timeout
        )
        for ref in stream:
            r = lattica.get(ref)
            r["centralized"] = central[r["round"]]
            rounds.append(r)
            print(
                f" {r['round']:>5}  {r['accuracy']:9.3f}  {r['centralized']:11.3f}  "
                f"{len(r['participants']):>7}  {r['timed_out'] or '-'!s:>9}  "
                f"{[f['client'] for f in r['failed']] or '-'!s:>6}  "
                f"{(r['bytes_down'] + r['bytes_up']) / 1e3:10.1f}  {r['seconds']:8.2f}"
            )
        wall = time.perf_counter() - started
    finally:
        mesh.stop()
    gap = rounds[-1]["centralized"] - rounds[-1]["accuracy"]
    print(
        f"final accuracy: federated {rounds[-1]['accuracy']:.3f}, centralized "
        f"{rounds[-1]['centralized']:.3f} (gap {100 * gap:.1f} points); {wall:.1f} s"
    )
    report = {
        "clients": args.clients,
        "alpha": args.alpha,
        "rounds": rounds,
        "final_federated": rounds[-1]["accuracy"],
        "final_centralized": rounds[-1]["centralized"],
        "gap_points": round(100 * gap, 2),
        "seconds": round(wall, 2),
        "machine": localmesh.machine_info(sklearn=sklearn.__version__),
    }
    if args.json:
        print(json.dumps(report))
    return 0 if gap <= 0.02 else 1


if __name__ == "__main__":
    sys.exit(main())
