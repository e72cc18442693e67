"""A tiny decoder-only transformer LM in numpy whose forward pass is exact, so a sharded,
batched run gives the same token ids as a single process, bit for bit.

The model is an int8-style transformer: weights are integers in [-127, 127] (seeded, defined
here, nothing downloaded), and every activation that enters a matrix product is re-quantized
per row to integers in [-127, 127] (absmax quantization, as int8 inference does). Products and
sums of such integers stay below 2**24, where float32 is exact, so every matmul gives the same
result whatever the batch shape, the BLAS kernel or its summation order. The remaining
operations are per-element (+, *, /, rint, floor), which IEEE rounds the same everywhere, and
the softmax uses an integer exp table. That is what lets the examples compare token ids for
equality instead of allclose.

Layout: token + position embedding -> n_layers x (attention with a KV cache, ReLU MLP, both
residual) -> logits against the tied token embedding -> greedy argmax. `StageCore` runs a
contiguous range of layers over a batch of requests and holds their KV caches; `TinyLM` is the
whole model in one process (the reference and the single-process baseline).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np

EXACT = 2**24  # float32 represents every integer below this exactly
Q = 127  # activations and weights are integers in [-Q, Q]
P = 255  # attention probabilities are integers in [0, P]
SCORE_SHIFT = 2**11  # attention scores are divided by this (exactly) before the exp table
_MASKED = np.iinfo(np.int64).min // 2
EXP_TABLE = np.array([round(65536 * math.exp(-k / 2)) for k in range(48)], dtype=np.int64)


@dataclass(frozen=True)
class Config:
    """The model's shape and weight seed. The defaults make a ~6 M parameter model."""

    vocab: int = 512
    d_model: int = 256
    n_layers: int = 8
    n_heads: int = 4
    d_ff: int = 1024
    max_seq: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError("d_model must be a multiple of n_heads")
        # every dot product of two int8-range vectors must stay exact in float32
        if Q * Q * max(self.d_model, self.d_ff) >= EXACT:
            raise ValueError("d_model and d_ff must be at most 1040 for exact float32 sums")
        if P * Q * self.max_seq >= EXACT:
            raise ValueError("max_seq must be at most 518 for exact attention sums")

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads

    def n_params(self) -> int:
        per_layer = 4 * self.d_model**2 + 2 * self.d_model * self.d_ff
        return self.n_layers * per_layer + (2 * self.vocab + self.max_seq) * self.d_model


def _int_weights(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return rng.integers(-Q, Q + 1, size=shape).astype(np.float32)


@dataclass
class LayerWeights:
    wq: np.ndarray
    wk: np.ndarray
    wv: np.ndarray
    wo: np.ndarray
    w1: np.ndarray
    w2: np.ndarray

    @classmethod
    def make(cls, cfg: Config, layer: int) -> LayerWeights:
        """Layer `layer`'s weights, from its own seed: a stage builds only the layers it holds."""
        rng = np.random.default_rng([cfg.seed, layer + 1])
        d, f = cfg.d_model, cfg.d_ff
        return cls(
            *(_int_weights(rng, (d, d)) for _ in range(4)),
            _int_weights(rng, (d, f)),
            _int_weights(rng, (f, d)),
        )


def embeddings(cfg: Config) -> tuple[np.ndarray, np.ndarray]:
    """(token embedding vocab x d, position embedding max_seq x d), for the first stage."""
    rng = np.random.default_rng([cfg.seed, 0])
    return _int_weights(rng, (cfg.vocab, cfg.d_model)), _int_weights(
        rng, (cfg.max_seq, cfg.d_model)
    )


def lm_head(cfg: Config) -> np.ndarray:
    """The output projection d x vocab, for the last stage. It is not tied to the token
    embedding: with random weights a tied head mostly predicts the input token again."""
    return _int_weights(
        np.random.default_rng([cfg.seed, cfg.n_layers + 1]), (cfg.d_model, cfg.vocab)
    )


def quant(x: np.ndarray) -> np.ndarray:
    """Each row scaled so its largest magnitude is Q, rounded to integers (float32)."""
    peak = np.maximum(np.abs(x).max(axis=-1, keepdims=True), np.float32(1))
    return np.rint(x * (np.float32(Q) / peak)).astype(np.float32)


def softmax_int(scores: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """Integer probabilities in [0, P] per row from integer scores; `allowed` masks the row."""
    s = np.floor(scores / np.float32(SCORE_SHIFT)).astype(np.int64)
    s = np.where(allowed, s, _MASKED)
    gap = np.minimum(s.max(axis=-1, keepdims=True) - s, len(EXP_TABLE) - 1)
    e = np.where(allowed, EXP_TABLE[gap], 0)
    return ((e * P) // e.sum(axis=-1, keepdims=True)).astype(np.float32)


@dataclass
class KVCache:
    """One request's keys and values for one layer; `length` positions are filled."""

    k: np.ndarray
    v: np.ndarray
    length: int = 0


@dataclass(frozen=True)
class Segment:
    """One request's part of a batch: its id, the position of its first new token, its new
    tokens' count (the prompt at prefill, 1 at decode)."""

    rid: int
    start: int
    count: int


class StaleCacheError(RuntimeError):
    """A stage was asked to continue a request whose KV cache it does not hold (it restarted,
    or the request was dropped): the request must be prefilled again from position 0."""


@dataclass
class StageCore:
    """Layers [first, last) of the model over batches of requests, with their KV caches.

    The first stage also embeds tokens; the last also computes logits and picks next tokens.
    `forward` takes the batch's segments and either token ids (first stage) or the previous
    stage's residual activations, and returns activations or, on the last stage, one next
    token per segment.
    """

    cfg: Config
    first: int
    last: int
    layers: list[LayerWeights] = field(init=False)
    caches: dict[int, list[KVCache]] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        if not 0 <= self.first < self.last <= self.cfg.n_layers:
            raise ValueError(f"bad layer range [{self.first}, {self.last})")
        self.layers = [LayerWeights.make(self.cfg, i) for i in range(self.first, self.last)]
        self.is_first = self.first == 0
        self.is_last = self.last == self.cfg.n_layers
        if self.is_first:
            self.tok_emb, self.pos_emb = embeddings(self.cfg)
        if self.is_last:
            self.head = lm_head(self.cfg)

    def drop(self, rids) -> None:
        for rid in rids:
            self.caches.pop(rid, None)

    def _caches_for(self, seg: Segment) -> list[KVCache]:
        if seg.start + seg.count > self.cfg.max_seq:
            raise ValueError(f"request {seg.rid} is longer than max_seq={self.cfg.max_seq}")
        if seg.start == 0:  # a (re)prefill starts the request's caches afresh
            shape = (self.cfg.max_seq, self.cfg.d_model)
            self.caches[seg.rid] = [
                KVCache(np.zeros(shape, np.float32), np.zeros(shape, np.float32))
                for _ in self.layers
            ]
        caches = self.caches.get(seg.rid)
        if caches is None or caches[0].length != seg.start:
            have = None if caches is None else caches[0].length
            raise StaleCacheError(
                f"stage [{self.first},{self.last}) has no KV cache for request {seg.rid} at "
                f"position {seg.start} (it holds {have})"
            )
        return caches

    def embed(self, segments: list[Segment], tokens: np.ndarray) -> np.ndarray:
        positions = np.concatenate([np.arange(s.start, s.start + s.count) for s in segments])
        return self.tok_emb[tokens] + self.pos_emb[positions]

    def forward(self, segments: list[Segment], x: np.ndarray) -> np.ndarray:
        """Run this stage's layers over the batch; `x` is token ids on the first stage."""
        caches = [self._caches_for(seg) for seg in segments]
        if self.is_first:
            x = self.embed(segments, np.asarray(x, dtype=np.int64))
        for index, w in enumerate(self.layers):
            x = self._layer(w, x, segments, [c[index] for c in caches])
        if self.is_last:
            return self.next_tokens(segments, x)
        return x

    def next_tokens(self, segments: list[Segment], x: np.ndarray) -> np.ndarray:
        """Greedy next token of each segment, from its last position's logits."""
        ends = np.cumsum([s.count for s in segments]) - 1
        logits = quant(x[ends]) @ self.head
        return logits.argmax(axis=-1)

    def _layer(
        self, w: LayerWeights, x: np.ndarray, segments: list[Segment], caches: list[KVCache]
    ) -> np.ndarray:
        cfg = self.cfg
        h = quant(x)
        q, k, v = quant(h @ w.wq), quant(h @ w.wk), quant(h @ w.wv)
        attn = np.empty_like(q)
        row = 0
        for seg, cache in zip(segments, caches):
            n, end = seg.count, seg.start + seg.count
            cache.k[seg.start : end] = k[row : row + n]
            cache.v[seg.start : end] = v[row : row + n]
            cache.length = end
            # new token j (at position start + j) sees positions 0 .. start + j
            allowed = np.arange(end)[None, :] <= (seg.start + np.arange(n))[:, None]
            heads = (cfg.n_heads, cfg.d_head)
            q_h = q[row : row + n].reshape(n, *heads).transpose(1, 0, 2)  # heads x n x d_head
            k_h = cache.k[:end].reshape(end, *heads).transpose(1, 2, 0)  # heads x d_head x end
            v_h = cache.v[:end].reshape(end, *heads).transpose(1, 0, 2)  # heads x end x d_head
            probs = softmax_int(q_h @ k_h, allowed)
            attn[row : row + n] = (probs @ v_h).transpose(1, 0, 2).reshape(n, cfg.d_model)
            row += n
        x = x + quant(quant(attn) @ w.wo)
        hidden = quant(np.maximum(quant(x) @ w.w1, 0))
        return x + quant(hidden @ w.w2)


def split_layers(n_layers: int, n_stages: int) -> list[tuple[int, int]]:
    """Contiguous layer ranges, as even as possible, one per stage."""
    if not 1 <= n_stages <= n_layers:
        raise ValueError(f"cannot split {n_layers} layers into {n_stages} stages")
    bounds = [round(i * n_layers / n_stages) for i in range(n_stages + 1)]
    return list(itertools.pairwise(bounds))


class TinyLM:
    """The whole model in this process: one StageCore over every layer."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.core = StageCore(cfg, 0, cfg.n_layers)

    def generate(self, prompt: list[int], max_new_tokens: int, rid: int = 0) -> list[int]:
        """Greedy generation for one request, alone (no batching): the reference output."""
        out: list[int] = []
        segment = Segment(rid, 0, len(prompt))
        tokens = np.asarray(prompt)
        try:
            for _ in range(max_new_tokens):
                token = int(self.core.forward([segment], tokens)[0])
                out.append(token)
                segment = Segment(rid, segment.start + segment.count, 1)
                tokens = np.asarray([token])
        finally:
            self.core.drop([rid])
        return out


def make_prompts(cfg: Config, count: int, length: int, seed: int = 1) -> list[list[int]]:
    """`count` seeded random prompts of `length` tokens."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, cfg.vocab, size=length).tolist() for _ in range(count)]
