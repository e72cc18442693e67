"""Remote functions on an embedded node: verbs, options, errors, retries, cancel, generators."""

import os
import time

import pytest

import latticaray as lattica


@lattica.remote
def double(x):
    return x * 2


@lattica.remote
def add(a, b=0):
    return a + b


@lattica.remote(num_returns=3)
def three(x):
    return x, x + 1, x + 2


@lattica.remote
def fail(message):
    raise ValueError(message)


@lattica.remote
def echo_ref_list(refs):
    return refs


@lattica.remote
def fanout(n):
    return sum(lattica.get([double.remote(i) for i in range(n)]))


@lattica.remote
def sleep_then(seconds, value):
    time.sleep(seconds)
    return value


def test_task_roundtrip(runtime):
    assert lattica.get(double.remote(21)) == 42
    assert lattica.get(add.remote(1, b=2)) == 3


def test_direct_call_refused(runtime):
    with pytest.raises(TypeError, match="remote"):
        double(1)


def test_refs_as_top_level_args_are_resolved(runtime):
    ref = double.remote(5)
    assert lattica.get(add.remote(ref, b=double.remote(1))) == 12


def test_nested_refs_pass_through_as_refs(runtime):
    inner = [lattica.put(1), lattica.put(2)]
    returned = lattica.get(echo_ref_list.remote(inner))
    assert all(isinstance(r, lattica.ObjectRef) for r in returned)
    assert lattica.get(returned) == [1, 2]


def test_nested_tasks(runtime):
    assert lattica.get(fanout.remote(20)) == sum(2 * i for i in range(20))


def test_multiple_returns(runtime):
    refs = three.remote(1)
    assert len(refs) == 3
    assert lattica.get(refs) == [1, 2, 3]


def test_options_override(runtime):
    refs = add.options(num_returns=1, num_cpus=0.5, max_retries=0).remote(2, 3)
    assert lattica.get(refs) == 5


def test_unknown_option_is_refused(runtime):
    with pytest.raises(ValueError, match="unknown option"):
        double.options(nonsense=1)


def test_ten_thousand_small_tasks(runtime):
    refs = [double.remote(i) for i in range(10_000)]
    assert lattica.get(refs) == [2 * i for i in range(10_000)]


def test_remote_error_carries_type_and_traceback(runtime):
    with pytest.raises(lattica.TaskError) as info:
        lattica.get(fail.remote("boom"))
    err = info.value
    assert isinstance(err, ValueError)
    assert err.cause_type == "ValueError"
    assert "boom" in err.remote_traceback and "in fail" in err.remote_traceback


def test_error_propagates_through_dependencies(runtime):
    with pytest.raises(ValueError, match="upstream"):
        lattica.get(add.remote(fail.remote("upstream"), 1))


def test_put_get_and_cid(runtime):
    ref = lattica.put({"a": [1, 2, 3]})
    assert lattica.get(ref) == {"a": [1, 2, 3]}
    cid = ref.cid
    assert cid.startswith("b") and str(ref) == cid
    assert lattica.get(cid) == {"a": [1, 2, 3]}
    task_ref = double.remote(4)
    assert lattica.get(str(task_ref)) == 8


def test_get_unknown_cid_fails_clearly(runtime):
    missing = lattica.put(b"unique-" + os.urandom(8)).cid
    other = missing[:-4] + ("aaaa" if not missing.endswith("aaaa") else "bbbb")
    with pytest.raises(lattica.ObjectNotFoundError):
        lattica.get(other)


def test_get_timeout(runtime):
    ref = sleep_then.remote(2.0, 1)
    with pytest.raises(lattica.GetTimeoutError):
        lattica.get(ref, timeout=0.1)
    assert lattica.get(ref, timeout=30) == 1


def test_wait(runtime):
    fast = double.remote(1)
    slow = sleep_then.remote(3.0, 2)
    ready, not_ready = lattica.wait([slow, fast], num_returns=1, timeout=20)
    assert ready == [fast] and not_ready == [slow]
    ready, not_ready = lattica.wait([slow, fast], num_returns=2, timeout=0.05)
    assert fast in ready and slow in not_ready
    ready, _ = lattica.wait([slow, fast], num_returns=2, timeout=30)
    assert len(ready) == 2


def test_runtime_context(runtime):
    @lattica.remote
    def where():
        ctx = lattica.get_runtime_context()
        return ctx.node_id, ctx.task_id

    node_id, task_id = lattica.get(where.remote())
    driver = lattica.get_runtime_context()
    assert node_id == driver.node_id
    assert task_id and driver.task_id is None


def test_cluster_resources(runtime):
    assert lattica.cluster_resources()["CPU"] == 2
    assert len(lattica.nodes()) == 1 and lattica.nodes()[0]["Alive"]
    assert "CPU" in lattica.available_resources()


def test_custom_resources_and_memory(runtime):
    assert lattica.get(double.options(memory=10 << 20).remote(3), timeout=30) == 6
    assert lattica.get(double.options(resources={"widget": 1}).remote(4), timeout=30) == 8
    with pytest.raises(lattica.TaskUnschedulableError, match="gizmo"):
        lattica.get(double.options(resources={"gizmo": 1}).remote(1), timeout=30)
    with pytest.raises(ValueError):
        double.options(resources={"CPU": 1})


def test_unschedulable(runtime):
    with pytest.raises(lattica.TaskUnschedulableError):
        lattica.get(double.options(num_gpus=4).remote(1), timeout=30)


def test_worker_death_is_retried(runtime, tmp_path):
    marker = tmp_path / "died-once"

    @lattica.remote(max_retries=2)
    def die_once(path):
        if not os.path.exists(path):
            open(path, "w").close()
            os._exit(1)
        return "survived"

    assert lattica.get(die_once.remote(str(marker)), timeout=60) == "survived"


def test_worker_death_without_retries_fails(runtime):
    @lattica.remote(max_retries=0)
    def die():
        os._exit(1)

    with pytest.raises(lattica.WorkerCrashedError):
        lattica.get(die.remote(), timeout=60)


def test_retry_exceptions(runtime, tmp_path):
    marker = tmp_path / "raised-once"

    @lattica.remote(retry_exceptions=[KeyError], max_retries=1)
    def flaky(path):
        if not os.path.exists(path):
            open(path, "w").close()
            raise KeyError("first attempt")
        return "ok"

    assert lattica.get(flaky.remote(str(marker)), timeout=60) == "ok"
    with pytest.raises(ValueError):
        lattica.get(fail.options(retry_exceptions=[KeyError]).remote("not retried"), timeout=60)


def test_force_cancel_kills_worker(runtime, tmp_path):
    started = tmp_path / "started"

    @lattica.remote
    def spin(path):
        open(path, "w").close()
        while True:
            pass

    ref = spin.remote(str(started))
    deadline = time.monotonic() + 30
    while not started.exists():
        assert time.monotonic() < deadline, "the task never started"
        time.sleep(0.01)
    lattica.cancel(ref, force=True)
    with pytest.raises(lattica.TaskCancelledError):
        lattica.get(ref, timeout=30)
    assert lattica.get(double.remote(2), timeout=30) == 4


def test_cancel_queued_task(runtime):
    blockers = [sleep_then.remote(1.0, i) for i in range(2)]
    queued = double.remote(7)
    lattica.cancel(queued)
    with pytest.raises(lattica.TaskCancelledError):
        lattica.get(queued, timeout=30)
    assert lattica.get(blockers, timeout=30) == [0, 1]


@lattica.remote
def count_to(n):
    yield from range(n)


def test_streaming_generator(runtime):
    gen = count_to.remote(5)
    assert isinstance(gen, lattica.ObjectRefGenerator)
    assert [lattica.get(ref) for ref in gen] == [0, 1, 2, 3, 4]


def test_streaming_generator_backpressure(runtime, tmp_path):
    progress = tmp_path / "progress"

    @lattica.remote(_generator_backpressure_num_objects=2)
    def produce(path):
        for i in range(10):
            with open(path, "w") as f:
                f.write(str(i))
            yield i

    gen = produce.remote(str(progress))
    first = next(gen)
    assert lattica.get(first) == 0
    deadline = time.monotonic() + 10
    while not progress.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.5)
    assert int(progress.read_text()) <= 3  # held back: at most window items beyond consumed
    assert [lattica.get(r) for r in gen] == list(range(1, 10))


def test_streaming_generator_error(runtime):
    @lattica.remote
    def broken():
        yield 1
        raise RuntimeError("mid-stream")

    gen = broken.remote()
    assert lattica.get(next(gen)) == 1
    with pytest.raises(RuntimeError, match="mid-stream"):
        lattica.get(next(gen))
    with pytest.raises(StopIteration):
        next(gen)


def test_large_object_roundtrip(runtime):
    blob = os.urandom(8 << 20)
    ref = lattica.put(blob)
    assert lattica.get(add.remote(ref, b"!")) == blob + b"!"


def test_large_arrays_travel_through_shared_memory_without_copies(runtime):
    import numpy as np

    @lattica.remote
    def inspect_array(arr):
        # a zero-copy view of the shared-memory store is read-only
        return arr.flags.writeable, float(arr.sum())

    @lattica.remote
    def make_array(n):
        return np.arange(n, dtype=np.float64)

    arr = np.ones(1 << 20, dtype=np.float64)
    ref = lattica.put(arr)
    assert ref.cid.startswith("bafy")
    writeable, total = lattica.get(inspect_array.remote(ref))
    assert writeable is False and total == float(1 << 20)
    result = lattica.get(make_array.remote(1 << 20))
    assert result.flags.writeable is False and result[-1] == (1 << 20) - 1
    assert lattica.get(ref.cid).shape == arr.shape


def test_put_ref_dropped_right_after_submit_stays_readable(runtime):
    import numpy as np

    @lattica.remote
    def total(arr):
        time.sleep(0.2)
        return float(arr.sum())

    lattica.get(total.remote(np.zeros(4)))  # the workers are up: the next tasks queue quickly
    refs = [total.remote(lattica.put(np.full(1 << 18, i, dtype=np.float64))) for i in range(6)]
    import gc

    from latticaray.runtime import context

    gc.collect()  # the put refs are gone: only the queued tasks keep the arrays alive
    context.current_core().flush_releases()
    assert lattica.get(refs, timeout=60) == [float(i * (1 << 18)) for i in range(6)]


@lattica.remote
def put_in_worker(value):
    return lattica.put(value).cid


def test_the_same_value_has_one_cid_wherever_it_is_put(runtime):
    # refs are CIDs any member resolves: a worker's put and the driver's name a value alike
    import numpy as np

    for value in (b"small value", np.arange(1 << 20, dtype=np.int64), bytes(3 << 20)):
        here = lattica.put(value).cid
        there = lattica.get(put_in_worker.remote(value))
        assert here == there, (type(value).__name__, here, there)


def test_wait_splits_in_list_order(runtime):
    slow = sleep_then.remote(3.0, "slow")
    fast = [sleep_then.remote(0.0, i) for i in range(4)]
    refs = [fast[0], slow, fast[1], fast[2], fast[3]]
    lattica.get(fast)
    ready, not_ready = lattica.wait(refs, num_returns=2, timeout=10)
    assert ready == [fast[0], fast[1]] and not_ready == [slow, fast[2], fast[3]]
    ready, not_ready = lattica.wait(refs, num_returns=4, timeout=10)
    assert ready == fast and not_ready == [slow]
    ready, not_ready = lattica.wait(refs, num_returns=5, timeout=0.1)
    assert ready == fast and not_ready == [slow]
