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
