"""The sharded-inference example: exactness of the model, the batcher, the pipeline, stage death."""

from __future__ import annotations

import lmserve
import numpy as np
import pytest
import tinylm
from exampleutil import run_example

SMALL = tinylm.Config(vocab=256, d_model=128, n_layers=4, n_heads=2, d_ff=512, max_seq=96)


def test_batched_forward_equals_each_request_alone():
    """Integer-exact arithmetic: a request's tokens do not depend on what it is batched with."""
    prompts = tinylm.make_prompts(SMALL, 5, 7)
    alone = [tinylm.TinyLM(SMALL).generate(p, 12) for p in prompts]
    batched, stats = lmserve.run_local(SMALL, prompts, 12, max_batch=3)
    assert batched == alone
    assert len({tuple(o) for o in alone}) == 5 and all(len(set(o)) > 3 for o in alone)
    assert stats["tokens_per_s"] > 0 and len(stats["ttft_s"]) == 5


def test_stages_chained_by_hand_equal_the_whole_model():
    whole = tinylm.StageCore(SMALL, 0, SMALL.n_layers)
    parts = [tinylm.StageCore(SMALL, a, b) for a, b in tinylm.split_layers(SMALL.n_layers, 3)]
    segments = [tinylm.Segment(0, 0, 6), tinylm.Segment(1, 0, 4)]
    tokens = np.arange(10) * 7 % SMALL.vocab
    x = tokens
    for part in parts:
        x = part.forward(segments, x)
    assert x.tolist() == whole.forward(segments, tokens).tolist()


def test_stage_refuses_a_step_it_has_no_cache_for():
    core = tinylm.StageCore(SMALL, 0, 2)
    with pytest.raises(tinylm.StaleCacheError, match="no KV cache for request 4"):
        core.forward([tinylm.Segment(4, 9, 1)], np.array([3]))


def test_config_refuses_shapes_float32_cannot_sum_exactly():
    with pytest.raises(ValueError, match="exact"):
        tinylm.Config(d_ff=2048)
    with pytest.raises(ValueError, match="max_seq"):
        tinylm.Config(max_seq=1024)


def test_batcher_continuous_batching_and_recompute_after_failure():
    b = lmserve.Batcher(max_seq=64, depth=2, max_batch=8, max_retries=1)
    b.add(0, [1, 2, 3], 3)
    b.add(1, [4, 5], 3)
    first = b.next_batch(0.0)  # 2 active, depth 2: one request per micro-batch
    second = b.next_batch(0.0)
    assert [s.rid for s in first.segments] == [0] and [s.rid for s in second.segments] == [1]
    assert b.next_batch(0.0) is None  # the pipeline is full
    assert [e.token for e in b.done(first, [7])] == [7]
    b.add(2, [9], 2)  # joins between steps
    third = b.next_batch(0.0)
    assert [(s.rid, s.start, s.count) for s in third.segments] == [(0, 3, 1), (2, 0, 1)]
    assert third.tokens.tolist() == [7, 9]
    # a failed step: its requests are prefilled again with what they produced, after a back-off
    assert b.failed(third, now=10.0) == []
    assert b.next_batch(10.0) is None
    again = b.next_batch(11.0)
    assert [(s.rid, s.start, s.count) for s in again.segments] == [(0, 0, 4), (2, 0, 1)]
    assert again.tokens.tolist() == [1, 2, 3, 7, 9]
    assert sorted(b.failed(again, now=11.0)) == [0, 2]  # second failure in a row: given up
    with pytest.raises(ValueError, match="max_seq"):
        b.add(5, [1] * 60, 10)


def test_sharded_pipeline_is_exact_and_survives_a_stage_death():
    """Two stages on two node processes; stage 1 killed mid-generation restarts, the server
    prefills the interrupted requests again, and every stream ends with the reference tokens."""
    report = run_example(
        "sharded_inference",
        "--stages", "2", "--layers", "4", "--d-model", "128", "--vocab", "256",
        "--requests", "4", "--prompt-len", "8", "--max-new", "24", "--repeat", "1",
        "--kill-stage", "1", "--kill-after", "6",
    )  # fmt: skip
    (setup,) = report["setups"]
    assert setup["exact"] and setup["stages"] == 2 and setup["nodes"] == 2
    kill = setup["kill"]
    assert kill["exact"] and kill["errors"] == [None] * 4, kill
    assert kill["restarted_pid"] != kill["killed_pid"]
    assert kill["failed_steps"] >= 1 and kill["recomputes"] >= 1, kill
    assert all(row["tokens_per_s"] > 0 for row in setup["rows"])


def test_a_stage_out_of_restarts_ends_the_stream_with_actor_died(embedded):
    """What the caller sees when a stage cannot come back: once the server has given up
    re-prefilling the request, the stream raises the stage's ActorDiedError, naming it."""
    lattica = embedded
    server, stages = lmserve.deploy(SMALL, 2, stage_resource=None, max_restarts=0)
    prompt = tinylm.make_prompts(SMALL, 1, 5)[0]
    stream = server.generate.remote(prompt, 40)
    got = [lattica.get(next(stream)) for _ in range(3)]
    lattica.kill(stages[1])  # no restart
    with pytest.raises(lattica.ActorDiedError) as info:
        for ref in stream:
            got.append(lattica.get(ref))
    assert stages[1].actor_id in str(info.value)
    assert got == tinylm.TinyLM(SMALL).generate(prompt, 40)[: len(got)]
    stats = lattica.get(server.stats.remote())
    assert stats["failed_steps"] >= 4  # 1 + max_retries attempts
    lattica.kill(server)
    lattica.kill(stages[0])
