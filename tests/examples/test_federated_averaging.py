"""The federated-averaging example: non-IID shards, FedAvg vs centralized, a stalled and a
crashed client that do not stall their rounds."""

from __future__ import annotations

import fedavg
import numpy as np
from exampleutil import run_example


def test_shards_are_non_iid_and_cover_the_training_data():
    _, _, y_train, _ = fedavg.load_data()
    shards = fedavg.split_non_iid(y_train, 8, alpha=0.5)
    assert sorted(np.concatenate(shards).tolist()) == list(range(len(y_train)))
    assert min(len(s) for s in shards) >= 10
    mixes = np.array([np.bincount(y_train[s], minlength=10) / len(s) for s in shards])
    uniform = np.bincount(y_train, minlength=10) / len(y_train)
    # total-variation distance of each client's label mix from the whole data's: skewed
    assert np.median(0.5 * np.abs(mixes - uniform).sum(axis=1)) > 0.25


def test_fedavg_matches_centralized_and_tolerates_a_stalled_and_a_crashed_client():
    timeout = 2.0
    report = run_example(
        "federated_averaging",
        "--clients", "4", "--nodes", "2", "--rounds", "20", "--round-timeout", str(timeout),
        "--stall-client", "1", "--crash-client", "2", "--fault-round", "2",
    )  # fmt: skip
    rounds = report["rounds"]
    assert len(rounds) == 20
    assert report["gap_points"] <= 2.0, report  # final accuracy within 2 points
    assert report["final_federated"] > 0.9
    # round 2: client 1 stalls for 2x the timeout; the round ends at its deadline without it
    stalled = rounds[2]
    assert stalled["timed_out"] == [1] and stalled["participants"] == [0, 2, 3], stalled
    assert timeout * 0.9 <= stalled["seconds"] < 2 * timeout, stalled
    # round 3: client 2's process dies mid-round; its update is left out, the round goes on
    crashed = rounds[3]
    assert [f["client"] for f in crashed["failed"]] == [2], crashed
    assert 2 not in crashed["participants"] and 0 in crashed["participants"]
    # the crashed client restarted (max_restarts=1), the stalled one woke up: all are back
    assert rounds[-1]["participants"] == [0, 1, 2, 3]
    model_bytes = fedavg.Model.size * 8
    assert rounds[-1]["bytes_down"] == 4 * model_bytes == rounds[-1]["bytes_up"]
