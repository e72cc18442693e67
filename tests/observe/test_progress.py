"""Progress bars: silent when not interactive and during the delay, shown after it."""

import io
import time

from latticaray.observe import progress
from latticaray.observe.progress import ProgressBar


class Tty(io.StringIO):
    def isatty(self):
        return True


def test_quiet_when_not_interactive(monkeypatch):
    monkeypatch.delenv("LATTICARAY_PROGRESS", raising=False)
    out = io.StringIO()  # not a terminal, not a notebook
    assert not progress.interactive(out)
    with ProgressBar(100 << 20, "get", file=out) as bar:
        bar.update_to(50 << 20)
        bar.update_to(100 << 20)
    assert out.getvalue() == "" and bar.done == 100 << 20


def test_environment_turns_bars_off_and_on(monkeypatch):
    monkeypatch.setenv("LATTICARAY_PROGRESS", "0")
    assert not progress.interactive(Tty())
    monkeypatch.setenv("LATTICARAY_PROGRESS", "1")
    assert progress.interactive(io.StringIO())


def test_silent_during_the_delay_then_shown(monkeypatch):
    monkeypatch.delenv("LATTICARAY_PROGRESS", raising=False)
    out = Tty()
    assert progress.interactive(out)
    bar = ProgressBar(10 << 20, "quick", file=out, delay=60.0)
    bar.update_to(10 << 20)
    bar.close()
    assert out.getvalue() == ""  # finished within its delay: nothing shown

    out = Tty()
    bar = ProgressBar(10 << 20, "slow", file=out, delay=0.05)
    bar.update_to(1 << 20)
    deadline = time.monotonic() + 5
    while "slow" not in out.getvalue() and time.monotonic() < deadline:
        time.sleep(0.06)
        bar.update_to(bar.done + (1 << 20))
    bar.update_to(10 << 20)
    bar.close()
    text = out.getvalue()
    assert "slow" in text and "10.0M" in text and "100%" in text


def test_update_to_never_goes_back_and_total_can_come_later():
    bar = ProgressBar(0, enabled=False)
    bar.set_total(1000)
    bar.update_to(600)
    bar.update_to(500)
    bar.update(100)
    assert bar.done == 700 and bar.total == 1000
    bar.close()
    bar.close()  # twice is harmless


class Rows:
    """A node's incoming transfers as a test sets them."""

    def __init__(self):
        self.rows = []
        self.fail = False

    def __call__(self):
        if self.fail:
            raise ConnectionError("node busy")
        return list(self.rows)


def test_transfer_watch_sums_the_transfers_it_sees(monkeypatch):
    monkeypatch.delenv("LATTICARAY_PROGRESS", raising=False)
    rows, out = Rows(), Tty()
    watch = progress.TransferWatch(rows, "get", delay=3600.0, file=out)
    assert watch.enabled  # a terminal
    with watch:
        watch.poll()
        assert watch.bar is None and out.getvalue() == ""  # nothing moving: no bar
        rows.rows = [("a/p1", 10 << 20, 100 << 20)]
        watch.poll()
        assert watch.bar is not None and watch.bar.total == 100 << 20
        assert watch.bar.done == 10 << 20
        rows.rows = [("a/p1", 60 << 20, 100 << 20), ("b/p2", 0, 50 << 20)]
        watch.poll()
        assert (watch.bar.done, watch.bar.total) == (60 << 20, 150 << 20)
        rows.fail = True
        watch.poll()  # a failed read changes nothing
        rows.fail = False
        rows.rows = [("b/p2", 20 << 20, 50 << 20)]  # a finished: gone from the rows
        watch.poll()
        assert (watch.bar.done, watch.bar.total) == (120 << 20, 150 << 20)
        bar = watch.bar
    assert bar.done == 150 << 20  # the call returned: all of it arrived
    text = out.getvalue()
    assert "get" in text and "100%" in text and "150M" in text


def test_transfer_watch_is_quiet_for_quick_calls_and_when_not_interactive(monkeypatch):
    monkeypatch.delenv("LATTICARAY_PROGRESS", raising=False)
    rows = Rows()
    rows.rows = [("a/p1", 1, 100 << 20)]
    out = Tty()
    with progress.TransferWatch(rows, "get", delay=3600.0, file=out) as watch:
        pass  # returned within the delay: the monitor never polled it
    assert watch.bar is None and out.getvalue() == ""
    quiet = io.StringIO()
    watch = progress.TransferWatch(rows, "get", delay=0.0, file=quiet)
    assert not watch.enabled
    with watch:
        time.sleep(0.05)  # the monitor would have polled an enabled watch by now
    assert watch.bar is None and quiet.getvalue() == ""


def test_transfer_watch_polls_on_the_monitor_thread_after_its_delay(monkeypatch):
    monkeypatch.delenv("LATTICARAY_PROGRESS", raising=False)
    rows, out = Rows(), Tty()
    rows.rows = [("a/p1", 5 << 20, 10 << 20)]
    with progress.TransferWatch(rows, "slow get", delay=0.05, interval=0.02, file=out) as watch:
        deadline = time.monotonic() + 10
        while watch.bar is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert watch.bar is not None
    assert "slow get" in out.getvalue() and "100%" in out.getvalue()


def test_the_delay_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("LATTICARAY_PROGRESS_DELAY", "0.25")
    assert progress.default_delay() == 0.25
    monkeypatch.setenv("LATTICARAY_PROGRESS_DELAY", "soon")
    assert progress.default_delay() == progress.DEFAULT_DELAY


def test_node_transfers_reads_the_incoming_rows_of_the_nodes_own_report():
    from latticaray.observe.gather import MeshSnapshot, encode_snapshot
    from latticaray.observe.model import TransferRow

    asked = []

    def request(message):
        asked.append(message)
        snap = MeshSnapshot(observer="n1", taken_at=0.0)
        snap.transfers = [
            TransferRow(object_id="bafyA", node_id="n1", peer="n2", bytes_done=5, bytes_total=9),
            TransferRow(object_id="bafyB", node_id="n1", direction="out", bytes_total=7),
        ]
        return {"snapshot": encode_snapshot(snap)}

    rows = list(progress.node_transfers(request)())
    assert rows == [("bafyA/n2", 5, 9)]
    assert asked == [{"op": "state", "limit": 1, "remote": False, "timeout": 1.0}]
