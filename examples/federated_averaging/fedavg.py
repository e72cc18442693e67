"""Federated averaging on scikit-learn's bundled digits: the model, the data split, the actors.

* `Model`: multinomial logistic regression in numpy (weights W 64x10 and bias b), trained by
  minibatch SGD with a small L2 penalty. Its parameters travel as one flat float64 array.
* `split_non_iid`: a stratified train/test split of `load_digits` (shipped inside scikit-learn,
  nothing downloaded), the training part dealt to clients by a Dirichlet draw over labels, so
  each client sees a skewed mix of digits (non-IID).
* `Client`: an actor holding one shard; `train` runs local epochs from the global weights.
* `Coordinator`: an actor that runs FedAvg rounds: it puts the global weights in the object
  store once per round (every client fetches the same ref), waits for updates until the round's
  deadline, and averages those that arrived, weighted by their sample counts. A client that
  crashes or stalls is left out of that round's average instead of stalling the round.
"""

from __future__ import annotations

import os
import sys
import time

import cloudpickle
import numpy as np

import latticaray as lattica

# Worker processes on other nodes cannot import this folder by name: ship this module by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

N_FEATURES, N_CLASSES = 64, 10


class Model:
    """Softmax regression; `params` is W (64x10) and b (10) flattened into one array."""

    size = N_FEATURES * N_CLASSES + N_CLASSES

    @staticmethod
    def init(seed: int = 0) -> np.ndarray:
        return np.random.default_rng(seed).normal(0, 0.01, Model.size)

    @staticmethod
    def unpack(params: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return params[: N_FEATURES * N_CLASSES].reshape(N_FEATURES, N_CLASSES), params[-N_CLASSES:]

    @staticmethod
    def predict(params: np.ndarray, x: np.ndarray) -> np.ndarray:
        w, b = Model.unpack(params)
        return (x @ w + b).argmax(axis=1)

    @staticmethod
    def accuracy(params: np.ndarray, x: np.ndarray, y: np.ndarray) -> float:
        return float((Model.predict(params, x) == y).mean())

    @staticmethod
    def sgd(
        params: np.ndarray,
        x: np.ndarray,
        y: np.ndarray,
        epochs: int,
        lr: float = 0.1,
        batch: int = 32,
        l2: float = 1e-4,
        seed: int = 0,
    ) -> tuple[np.ndarray, float]:
        """`epochs` passes of minibatch SGD from `params`; (new params, last epoch's loss)."""
        params = params.copy()
        w, b = Model.unpack(params)  # views into params
        rng = np.random.default_rng(seed)
        loss = 0.0
        for _ in range(epochs):
            order = rng.permutation(len(y))
            total = 0.0
            for start in range(0, len(y), batch):
                idx = order[start : start + batch]
                logits = x[idx] @ w + b
                logits -= logits.max(axis=1, keepdims=True)
                p = np.exp(logits)
                p /= p.sum(axis=1, keepdims=True)
                total -= np.log(p[np.arange(len(idx)), y[idx]] + 1e-12).sum()
                p[np.arange(len(idx)), y[idx]] -= 1.0
                w -= lr * (x[idx].T @ p / len(idx) + l2 * w)
                b -= lr * p.mean(axis=0)
            loss = total / max(1, len(y))
        return params, loss


def load_data(test_fraction: float = 0.25, seed: int = 0):
    """(x_train, y_train, x_test, y_test) from scikit-learn's bundled digits, scaled to [0, 1]."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = digits.data / 16.0
    return train_test_split(
        x, digits.target, test_size=test_fraction, random_state=seed, stratify=digits.target
    )


def split_non_iid(
    y: np.ndarray, n_clients: int, alpha: float = 0.5, seed: int = 0
) -> list[np.ndarray]:
    """Indices of each client's shard: each label's samples dealt by a Dirichlet(alpha) draw
    (small alpha: each client sees few labels), every client getting at least 10 samples."""
    rng = np.random.default_rng(seed)
    for _ in range(100):
        shards: list[list[int]] = [[] for _ in range(n_clients)]
        for label in range(N_CLASSES):
            idx = rng.permutation(np.flatnonzero(y == label))
            cuts = (np.cumsum(rng.dirichlet([alpha] * n_clients)) * len(idx)).astype(int)[:-1]
            for client, part in enumerate(np.split(idx, cuts)):
                shards[client].extend(part.tolist())
        if min(len(s) for s in shards) >= 10:
            return [np.array(sorted(s)) for s in shards]
    raise ValueError(f"cannot deal {len(y)} samples to {n_clients} clients with >= 10 each")


@lattica.remote
class Client:
    """One participant: its private shard never leaves it; only model updates do."""

    def __init__(self, client_id: int, x: np.ndarray, y: np.ndarray, faults: dict | None = None):
        self.client_id = client_id
        self.x, self.y = x, y
        self.faults = faults or {}  # {"stall": (round, seconds), "crash": round}: for the demo

    def train(self, round_no: int, global_params: np.ndarray, epochs: int, lr: float, batch: int):
        stall = self.faults.get("stall")
        if stall is not None and stall[0] == round_no:
            time.sleep(stall[1])  # a client gone quiet (a laptop lid closed) for a while
        params, loss = Model.sgd(
            global_params, self.x, self.y, epochs, lr, batch, seed=1000 * round_no + self.client_id
        )
        if self.faults.get("crash") == round_no:
            os._exit(1)  # the client's process dies mid-round, its update never sent
        return {"client": self.client_id, "params": params, "n": len(self.y), "loss": loss}

    def label_counts(self) -> list[int]:
        return np.bincount(self.y, minlength=N_CLASSES).tolist()


@lattica.remote
class Coordinator:
    """Runs FedAvg rounds over `clients`; `fit` streams one report per round."""

    def __init__(self, clients: list, x_test: np.ndarray, y_test: np.ndarray, seed: int = 0):
        self.clients = clients
        self.x_test, self.y_test = x_test, y_test
        self.params = Model.init(seed)

    def fit(self, rounds: int, epochs: int, lr: float, batch: int, round_timeout: float):
        for round_no in range(rounds):
            yield self.run_round(round_no, epochs, lr, batch, round_timeout)

    def run_round(
        self, round_no: int, epochs: int, lr: float, batch: int, round_timeout: float
    ) -> dict:
        started = time.monotonic()
        global_ref = lattica.put(self.params)  # stored once; every client gets it by ref
        pending = {
            c.train.remote(round_no, global_ref, epochs, lr, batch): i
            for i, c in enumerate(self.clients)
        }
        ready, late = lattica.wait(list(pending), num_returns=len(pending), timeout=round_timeout)
        updates, failed = [], []
        for ref in ready:
            try:
                updates.append(lattica.get(ref))
            except (lattica.ActorDiedError, lattica.TaskError) as exc:
                failed.append({"client": pending[ref], "error": type(exc).__name__})
        for ref in late:  # not waited for: the round goes on without them
            lattica.cancel(ref)
        if updates:
            total = sum(u["n"] for u in updates)
            self.params = sum(u["params"] * (u["n"] / total) for u in updates)
        model_bytes = self.params.nbytes
        return {
            "round": round_no,
            "accuracy": Model.accuracy(self.params, self.x_test, self.y_test),
            "participants": sorted(u["client"] for u in updates),
            "timed_out": sorted(pending[r] for r in late),
            "failed": failed,
            "samples": sum(u["n"] for u in updates),
            # payload: the global weights to every client, an update back from each participant
            "bytes_down": model_bytes * len(pending),
            "bytes_up": model_bytes * len(updates),
            "seconds": time.monotonic() - started,
        }

    def weights(self) -> np.ndarray:
        return self.params
