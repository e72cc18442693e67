"""Worker output to the driver: batches, the batcher and dedup cores, the printer, the capture."""

import io
import subprocess
import sys
import textwrap
import time

import msgpack
import pytest

from latticaray.observe import metrics
from latticaray.observe.logs import (
    MAX_LINE,
    STDERR,
    STDOUT,
    LogBatch,
    LogBatcherCore,
    LogContext,
    LogDecodeError,
    LogDedupCore,
    LogPrinter,
    split_lines,
)


def batch(text, pid=10, node="hostB", name="f", stream=STDOUT, owner="drv"):
    lines = text if isinstance(text, list) else [text]
    return LogBatch(owner, "t1", node, pid, name, tuple((stream, t) for t in lines))


def test_batch_round_trip_and_refusals():
    b = batch(["one", "two"], stream=STDERR)
    assert LogBatch.decode(b.encode()) == b
    for bad in (
        [1, "t", "n", 1, "f", []],
        ["o", "t", "n", -1, "f", []],
        ["o", "t", "n", 1, "f", [[3, "x"]]],
        ["o", "t", "n", 1, "f", [[1, 2]]],
        ["o", "t", "n", 1, "f", "lines"],
        ["o", "t", "n", 1, "f"],
        ["o", "t", "n", 1, "f", [[1, "x" * (MAX_LINE + 1)]]],
        ["o", None, "n", 1, "f", []],
    ):
        with pytest.raises(LogDecodeError):
            LogBatch.decode(msgpack.packb(bad))
    with pytest.raises(LogDecodeError):
        LogBatch.decode(b"\xc1")


def test_split_lines_keeps_partial_lines_and_splits_long_ones():
    lines, rest = split_lines("ab", "c\r\nd\ne")
    assert lines == ["abc", "d"] and rest == "e"
    lines, rest = split_lines("", "x" * (2 * MAX_LINE + 5))
    assert lines == ["x" * MAX_LINE] * 2 and rest == "x" * 5


def test_batcher_groups_by_task_and_flushes_on_time_and_size():
    core = LogBatcherCore("hostB", 77, interval=0.1, max_lines=3)
    a, b = LogContext("f", "t1"), LogContext("g", "t2")
    assert core.add(a, STDOUT, "1", 0.0) == []
    assert core.add(b, STDERR, "x", 0.05) == []
    assert core.deadline() == pytest.approx(0.1)
    assert core.add(a, STDOUT, "2", 0.06) == []
    full = core.add(a, STDOUT, "3", 0.07)
    assert [(x.owner, x.task_id, x.name, x.lines) for x in full] == [
        ("", "t1", "f", ((1, "1"), (1, "2"), (1, "3")))
    ]
    assert core.due(0.1) == []
    due = core.due(0.16)
    assert [(x.task_id, x.pid, x.node, x.lines) for x in due] == [("t2", 77, "hostB", ((2, "x"),))]
    core.add(a, STDOUT, "4", 1.0)
    assert [x.lines for x in core.flush()] == [((1, "4"),)] and core.deadline() is None


def test_dedup_prints_first_and_counts_repeats_across_sources():
    core = LogDedupCore(window=5.0)
    out = core.receive(batch("loss 0.51 at step 3", pid=1), 0.0)
    assert [o.text for o in out] == ["(f pid=1, node=hostB) loss 0.51 at step 3"]
    assert core.receive(batch("loss 0.49 at step 3", pid=2), 1.0) == []
    assert core.receive(batch("loss 0.47 at step 3", pid=3, node="hostC"), 2.0) == []
    # the same source printing the same line again is never merged
    assert len(core.receive(batch("loss 0.51 at step 3", pid=1), 2.5)) == 1
    assert core.deadline() == pytest.approx(5.0)
    assert core.poll(4.9) == []
    summary = core.poll(5.0)
    assert [o.text for o in summary] == [
        "(f pid=1, node=hostB) loss 0.51 at step 3 [repeated 2x across cluster]"
    ]
    assert core.receive(batch("loss 0.40 at step 3", pid=2), 6.0)  # a new window


def test_rate_limit_drops_and_says_how_many_once_a_second():
    dropped_before = metrics.LOG_LINES.values().get(("dropped",), 0)
    core = LogDedupCore(rate=10.0, burst=5, dedup=False)
    out = core.receive(batch([f"line {i}" for i in range(20)]), 0.0)
    assert len(out) == 5
    notice = core.poll(0.0)
    assert len(notice) == 1 and "15 lines dropped" in notice[0].text
    assert notice[0].stream == STDERR
    assert len(core.receive(batch([f"more {i}" for i in range(3)]), 0.05)) == 0  # no tokens
    assert core.poll(0.5) == []  # the next notice waits a second
    assert core.deadline() == pytest.approx(1.0)
    assert "3 lines dropped" in core.poll(1.0)[0].text
    assert len(core.receive(batch(["later"]), 2.0)) == 1  # refilled
    assert metrics.LOG_LINES.values()[("dropped",)] - dropped_before == 18


def test_printer_writes_from_its_thread_and_flushes_at_stop():
    out, err = io.StringIO(), io.StringIO()
    printer = LogPrinter(LogDedupCore(window=60.0), stdout=out, stderr=err).start()
    printer.submit(batch("hello", pid=1))
    printer.submit(batch("hello", pid=2))
    printer.submit(batch("oops", pid=1, stream=STDERR))
    printer.stop()
    assert out.getvalue().splitlines() == [
        "(f pid=1, node=hostB) hello",
        "(f pid=1, node=hostB) hello [repeated 1x across cluster]",
    ]
    assert err.getvalue() == "(f pid=1, node=hostB) oops\n"
    assert not printer.submit(batch("late"))


def test_printer_writes_at_once_and_summaries_on_time():
    out = io.StringIO()
    printer = LogPrinter(LogDedupCore(window=0.2), stdout=out).start()
    printer.submit(batch("same", pid=1))
    assert out.getvalue() == "(f pid=1, node=hostB) same\n"  # written by submit itself
    printer.submit(batch("same", pid=2))
    deadline = time.monotonic() + 10
    while "repeated" not in out.getvalue():
        assert time.monotonic() < deadline, out.getvalue()
        time.sleep(0.02)
    assert out.getvalue().endswith("same [repeated 1x across cluster]\n")
    printer.stop()


CAPTURE_SCRIPT = textwrap.dedent(
    """
    import os, sys, threading, msgpack
    from latticaray.observe.capture import OutputCapture
    from latticaray.observe.logs import LogContext

    sent = []
    cap = OutputCapture("hostB", sent.append, pid=99, interval=0.05).start()
    print("before any task")
    cap.set_context(LogContext("square", "t1"))
    print("python line", 1)
    print("partial", end="")
    sys.stderr.write("an error line\\n")
    os.write(1, b"from C level\\n")
    def in_thread():
        cap.set_context(LogContext("Actor.method", "t2"), thread_only=True)
        print("thread line")
    t = threading.Thread(target=in_thread); t.start(); t.join()
    os.write(1, b"c-partial")
    cap.flush()
    cap.set_context(None)
    cap.stop()
    print("after stop goes to the real stdout")
    with open(sys.argv[1], "wb") as fh:
        fh.write(msgpack.packb([b.encode() for b in sent]))
    """
)


def test_capture_tags_python_and_fd_level_output(tmp_path):
    result_path = tmp_path / "batches"
    proc = subprocess.run(
        [sys.executable, "-c", CAPTURE_SCRIPT, str(result_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "after stop goes to the real stdout\n"
    batches = [LogBatch.decode(b) for b in msgpack.unpackb(result_path.read_bytes())]
    lines = {}
    for b in batches:
        assert b.pid == 99 and b.node == "hostB"
        for stream, text in b.lines:
            lines.setdefault((b.task_id, b.name), []).append((stream, text))
    assert lines[("", "worker")] == [(STDOUT, "before any task")]
    got = lines[("t1", "square")]
    assert (STDOUT, "python line 1") in got and (STDERR, "an error line") in got
    assert (STDOUT, "partial") in got  # flushed at the task's end
    assert (STDOUT, "from C level") in got
    assert (STDOUT, "c-partial") in got  # a pipe's partial line too, in order
    assert got.index((STDOUT, "from C level")) < got.index((STDOUT, "c-partial"))
    assert lines[("t2", "Actor.method")] == [(STDOUT, "thread line")]
