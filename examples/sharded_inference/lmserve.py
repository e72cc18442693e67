"""Serving the tiny LM as a pipeline of stage actors, with continuous batching.

* `Batcher`: the continuous-batching scheduler as a plain class (no I/O, no clock of its own):
  requests join and leave between steps; each step is a micro-batch of requests, a prefill
  segment for new ones and a one-token decode segment for the others. Up to `depth`
  micro-batches are in flight at once so that every stage of the pipeline has work.
* `Stage`: an actor holding a contiguous range of layers and their KV caches. It runs its
  layers on a micro-batch and hands the activations to the next stage itself (actor to actor:
  the driver never sees them); the last stage returns the next tokens, which travel back up the
  chain of calls to the server.
* `LMServer`: an async actor that owns the Batcher, feeds the first stage and streams each
  request's tokens back to its caller from `generate`, a streaming generator.
* `run_local`: the same Batcher driving one in-process StageCore: the single-process baseline.

Fault handling: a stage that dies loses its KV caches. It restarts (max_restarts) and rebuilds
its weights from the seed, but a decode step cannot simply be re-run on it (max_task_retries
would do that) because the step depends on the cache that died. So the server retries the
*request*: every request of a failed micro-batch is prefilled again from its prompt plus the
tokens it already produced (recompute, as vLLM does after preemption). The model is exact, so
the continuation is the same token ids an undisturbed run gives. A request that fails
`max_retries` times in a row ends its stream with the error (see README).
"""

from __future__ import annotations

import asyncio
import itertools
import math
import os
import sys
import time
from dataclasses import dataclass, field

import cloudpickle
import numpy as np
import tinylm
from tinylm import Config, Segment, StageCore, StaleCacheError

import latticaray as lattica

# Worker processes on other nodes cannot import this folder's modules by name, so their code
# travels by value with the actors (Ray would use runtime_env={"py_modules": [...]}).
cloudpickle.register_pickle_by_value(tinylm)
cloudpickle.register_pickle_by_value(sys.modules[__name__])


@dataclass
class Request:
    rid: int
    prompt: list[int]
    max_new: int
    out: list[int] = field(default_factory=list)
    fed: int = 0  # positions whose keys and values the stages hold (0: prefill next)
    in_flight: bool = False
    failures: int = 0  # consecutive failed steps
    not_before: float = 0.0  # retry back-off


@dataclass(frozen=True)
class Batch:
    bid: int
    segments: list[Segment]
    tokens: np.ndarray  # the new tokens of every segment, concatenated


@dataclass(frozen=True)
class Emit:
    """What a finished step means for one request: a new token, maybe its last."""

    rid: int
    token: int
    finished: bool


class Batcher:
    """Continuous batching over a pipeline `depth` micro-batches deep (see module docstring)."""

    def __init__(
        self, max_seq: int, depth: int = 1, max_batch: int = 32, max_retries: int = 3
    ) -> None:
        self.max_seq = max_seq
        self.depth = depth
        self.max_batch = max_batch
        self.max_retries = max_retries
        self.active: dict[int, Request] = {}
        self.in_flight: dict[int, Batch] = {}
        self._bids = itertools.count()
        self.stats = {"steps": 0, "rows": 0, "prefills": 0, "recomputes": 0, "failed_steps": 0}

    def add(self, rid: int, prompt: list[int], max_new: int) -> None:
        if not prompt or max_new < 1:
            raise ValueError("a request needs a non-empty prompt and max_new_tokens >= 1")
        if len(prompt) + max_new > self.max_seq:
            raise ValueError(f"prompt + max_new_tokens exceeds max_seq={self.max_seq}")
        if rid in self.active:
            raise ValueError(f"request id {rid} is already active")
        self.active[rid] = Request(rid, list(prompt), max_new)

    def next_batch(self, now: float) -> Batch | None:
        """The next micro-batch to send, or None (pipeline full, or nothing ready)."""
        if len(self.in_flight) >= self.depth:
            return None
        ready = [r for r in self.active.values() if not r.in_flight and r.not_before <= now]
        if not ready:
            return None
        # spread the active requests over `depth` micro-batches so every stage has work
        limit = min(self.max_batch, max(1, math.ceil(len(self.active) / self.depth)))
        segments, tokens = [], []
        for r in ready[:limit]:
            if r.fed == 0:  # prefill (again, after a failure: the prompt and what it produced)
                new = r.prompt + r.out
                self.stats["prefills"] += 1
            else:
                new = r.out[-1:]
            segments.append(Segment(r.rid, r.fed, len(new)))
            tokens.extend(new)
            r.in_flight = True
        batch = Batch(next(self._bids), segments, np.asarray(tokens, dtype=np.int64))
        self.in_flight[batch.bid] = batch
        self.stats["steps"] += 1
        self.stats["rows"] += len(segments)
        return batch

    def done(self, batch: Batch, next_tokens) -> list[Emit]:
        """A micro-batch came back with one next token per segment."""
        del self.in_flight[batch.bid]
        emits = []
        for seg, token in zip(batch.segments, next_tokens):
            r = self.active[seg.rid]
            r.in_flight = False
            r.failures = 0
            r.fed = seg.start + seg.count
            r.out.append(int(token))
            finished = len(r.out) >= r.max_new
            if finished:
                del self.active[seg.rid]
            emits.append(Emit(seg.rid, int(token), finished))
        return emits

    def failed(self, batch: Batch, now: float) -> list[int]:
        """A micro-batch failed: its requests will be prefilled again after a back-off; the ids
        of those that failed `max_retries` times in a row are returned (and dropped)."""
        del self.in_flight[batch.bid]
        self.stats["failed_steps"] += 1
        given_up = []
        for seg in batch.segments:
            r = self.active[seg.rid]
            r.in_flight = False
            r.fed = 0
            r.failures += 1
            r.not_before = now + 0.05 * 2**r.failures
            self.stats["recomputes"] += 1
            if r.failures > self.max_retries:
                del self.active[seg.rid]
                given_up.append(seg.rid)
        return given_up

    def next_wakeup(self) -> float | None:
        """When a backed-off request becomes ready (None: nothing is waiting on a back-off)."""
        waiting = [r.not_before for r in self.active.values() if not r.in_flight]
        return min(waiting) if waiting else None


# ---------------------------------------------------------------------- actors


@lattica.remote
class Stage:
    """Layers [first, last) and their KV caches; forwards activations to the next stage."""

    def __init__(self, cfg: Config, first: int, last: int, next_stage=None):
        self.core = StageCore(cfg, first, last)
        self.next = next_stage

    async def forward(self, segments: list[Segment], x: np.ndarray) -> np.ndarray:
        out = self.core.forward(segments, x)
        if self.next is None:
            return out  # the last stage: the next token of each segment
        return await self.next.forward.remote(segments, out)

    def drop(self, rids: list[int]) -> None:
        self.core.drop(rids)

    def where(self) -> dict:
        return {
            "node": lattica.get_runtime_context().node_id,
            "pid": os.getpid(),
            "layers": [self.core.first, self.core.last],
        }


@lattica.remote
class LMServer:
    """The front of the pipeline: continuous batching, and a token stream per request."""

    def __init__(self, cfg: Config, stages: list, max_batch: int = 32, max_retries: int = 3):
        self.stages = stages
        self.batcher = Batcher(cfg.max_seq, len(stages), max_batch, max_retries)
        self.queues: dict[int, asyncio.Queue] = {}
        self.rids = itertools.count()
        self.errors: list[str] = []
        self._wakeup: asyncio.TimerHandle | None = None
        self.steps: set[asyncio.Task] = set()

    async def generate(self, prompt: list[int], max_new_tokens: int):
        """Yields the request's tokens one at a time as the pipeline produces them."""
        rid = next(self.rids)
        self.batcher.add(rid, prompt, max_new_tokens)
        queue = self.queues[rid] = asyncio.Queue()
        self._pump()
        try:
            while True:
                item = await queue.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            del self.queues[rid]

    def _pump(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        while (batch := self.batcher.next_batch(now)) is not None:
            task = loop.create_task(self._step(batch))
            self.steps.add(task)  # held until done, so the loop does not drop it
            task.add_done_callback(self.steps.discard)
        wake = self.batcher.next_wakeup()
        if wake is not None and wake > now and self._wakeup is None:
            self._wakeup = loop.call_at(wake, self._woken)

    def _woken(self) -> None:
        self._wakeup = None
        self._pump()

    async def _step(self, batch: Batch) -> None:
        try:
            tokens = await self.stages[0].forward.remote(batch.segments, batch.tokens)
        except (lattica.ActorDiedError, StaleCacheError, lattica.TaskError) as exc:
            # a stage died (or restarted and lost its caches): prefill these requests again
            self.errors.append(f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
            for rid in self.batcher.failed(batch, asyncio.get_running_loop().time()):
                self.queues[rid].put_nowait(exc)
        else:
            finished = []
            for emit in self.batcher.done(batch, tokens):
                queue = self.queues[emit.rid]
                queue.put_nowait(emit.token)
                if emit.finished:
                    queue.put_nowait(None)
                    finished.append(emit.rid)
            if finished:
                for stage in self.stages:  # free their KV caches (fire and forget)
                    stage.drop.remote(finished)
        self._pump()

    def stats(self) -> dict:
        return dict(self.batcher.stats, errors=list(self.errors))


def deploy(
    cfg: Config,
    n_stages: int,
    stage_resource: str | None = "lm_stage",
    max_restarts: int = 2,
    server_options: dict | None = None,
    groups: list | None = None,
) -> tuple[object, list]:
    """Create the stage actors (last first, so each knows its successor) and the server.

    With `stage_resource`, the stages are placed in a STRICT_SPREAD placement group of one
    bundle of `stage_resource` per stage: each on its own node, among the nodes that offer it
    (the group is appended to `groups`, for the caller to remove).
    """
    from latticaray.util.placement_group import placement_group
    from latticaray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    group = None
    if stage_resource:
        group = placement_group([{stage_resource: 1}] * n_stages, strategy="STRICT_SPREAD")
        if groups is not None:
            groups.append(group)
        lattica.get(group.ready(), timeout=120)
    stages: list = []
    next_stage = None
    split = tinylm.split_layers(cfg.n_layers, n_stages)
    for index, (first, last) in reversed(list(enumerate(split))):
        options: dict = {"max_restarts": max_restarts, "max_concurrency": 2 * n_stages + 2}
        if group is not None:
            options["resources"] = {stage_resource: 1}
            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(group, index)
        next_stage = Stage.options(**options).remote(cfg, first, last, next_stage)
        stages.insert(0, next_stage)
    server = LMServer.options(max_concurrency=1000, **(server_options or {})).remote(cfg, stages)
    return server, stages


# ---------------------------------------------------------------------- in one process


def run_local(
    cfg: Config, prompts: list[list[int]], max_new: int, max_batch: int = 32
) -> tuple[list[list[int]], dict]:
    """All requests at once through the same Batcher on one in-process StageCore: the
    single-process baseline. Returns the outputs and {tokens_per_s, ttft_s (per request)}."""
    core = StageCore(cfg, 0, cfg.n_layers)
    batcher = Batcher(cfg.max_seq, 1, max_batch)
    start = time.perf_counter()
    for rid, prompt in enumerate(prompts):
        batcher.add(rid, prompt, max_new)
    outs: list[list[int]] = [[] for _ in prompts]
    first: list[float] = [0.0] * len(prompts)
    while (batch := batcher.next_batch(0.0)) is not None:
        for emit in batcher.done(batch, core.forward(batch.segments, batch.tokens)):
            if not outs[emit.rid]:
                first[emit.rid] = time.perf_counter() - start
            outs[emit.rid].append(emit.token)
            if emit.finished:
                core.drop([emit.rid])
    wall = time.perf_counter() - start
    return outs, {"tokens_per_s": len(prompts) * max_new / wall, "ttft_s": first}
