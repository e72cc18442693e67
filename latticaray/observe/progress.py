"""Progress bars for long transfers: a notebook widget or a terminal bar, never in a log file.

:class:`ProgressBar` wraps ``tqdm.auto`` (the ipywidgets bar inside a Jupyter kernel when
ipywidgets is installed, the text bar on stderr otherwise). It shows nothing during its first
``delay`` seconds (1 s by default: short transfers stay silent) and nothing at all when the
process is not interactive — neither a terminal on stderr nor a notebook kernel — so scripts,
services and CI logs stay clean. ``LATTICARAY_PROGRESS=0`` turns bars off, ``=1`` forces them
on; ``enabled=`` overrides both.

Updates may come from any thread; tqdm serialises them.

    with ProgressBar(total=size, desc="get bafy…") as bar:
        bar.update_to(bytes_done)

:class:`TransferWatch` puts one bar over the transfers a blocking call waits for (``get()`` of a
remote object): a thread that sleeps through the delay, then reads the node's incoming
transfers (``read()``: ``(key, bytes done, bytes total)`` rows, e.g. from
:func:`node_transfers`) a few times a second and shows their sum. When not interactive it
starts no thread at all.

    with TransferWatch(node_transfers(core.request), desc="get"):
        value = core.get(refs, timeout)
"""

from __future__ import annotations

import os
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import IO, Any

__all__ = [
    "ProgressBar",
    "TransferWatch",
    "default_delay",
    "in_notebook",
    "interactive",
    "node_transfers",
]

DEFAULT_DELAY = 1.0
#: How often a TransferWatch reads the transfers once its delay has passed.
POLL_INTERVAL = 0.2

TransferRows = Iterable[tuple[str, int, int]]


def default_delay() -> float:
    """Seconds before a bar shows: ``LATTICARAY_PROGRESS_DELAY`` or 1 s."""
    try:
        return max(0.0, float(os.environ.get("LATTICARAY_PROGRESS_DELAY", DEFAULT_DELAY)))
    except ValueError:
        return DEFAULT_DELAY


def in_notebook() -> bool:
    """True inside a Jupyter kernel (what tqdm.auto turns into a widget)."""
    if "ipykernel" not in sys.modules:
        return False
    ipython = sys.modules.get("IPython")
    get = getattr(ipython, "get_ipython", None)
    shell = get() if get is not None else None
    return shell is not None and "zmq" in type(shell).__name__.lower()


_seen_by_default: tuple[object, bool] | None = None  # (sys.stderr, whether it is seen)


def interactive(stream: IO[str] | None = None) -> bool:
    """Whether a progress bar would be seen: ``LATTICARAY_PROGRESS``, a notebook, or a TTY.
    For the default stream (stderr) the answer is kept while ``sys.stderr`` stays the same
    object (``get()`` asks on every call)."""
    global _seen_by_default
    forced = os.environ.get("LATTICARAY_PROGRESS")
    if forced:
        forced = forced.strip().lower()
        if forced in ("0", "false", "no", "off"):
            return False
        if forced in ("1", "true", "yes", "on"):
            return True
    if stream is None:
        known = _seen_by_default
        if known is not None and known[0] is sys.stderr:
            return known[1]
        seen = in_notebook() or _isatty(sys.stderr)
        _seen_by_default = (sys.stderr, seen)
        return seen
    return in_notebook() or _isatty(stream)


def _isatty(stream: IO[str] | None) -> bool:
    try:
        return bool(stream is not None and stream.isatty())
    except (AttributeError, ValueError):
        return False


def _tqdm_class() -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tqdm.auto warns when it falls back to text mode
        from tqdm.auto import tqdm
    return tqdm


class ProgressBar:
    """A bytes progress bar, silent when not interactive and during its first ``delay``."""

    def __init__(
        self,
        total: int,
        desc: str = "",
        *,
        delay: float | None = None,
        enabled: bool | None = None,
        unit: str = "B",
        file: IO[str] | None = None,
    ) -> None:
        self.total = max(0, int(total))
        self.done = 0
        self.enabled = interactive(file) if enabled is None else enabled
        self._lock = threading.Lock()
        self._bar: Any = None
        if self.enabled:
            cls = _tqdm_class()
            kwargs: dict[str, Any] = {
                "total": self.total,
                "desc": desc,
                "unit": unit,
                "unit_scale": unit == "B",
                "unit_divisor": 1024 if unit == "B" else 1000,
                "delay": default_delay() if delay is None else max(0.0, delay),
                "leave": True,
                "dynamic_ncols": True,
            }
            if file is not None:
                kwargs["file"] = file
            self._bar = cls(**kwargs)

    def set_total(self, total: int) -> None:
        with self._lock:
            self.total = max(0, int(total))
            if self._bar is not None:
                self._bar.total = self.total
                self._bar.refresh()

    def update(self, amount: int) -> None:
        with self._lock:
            self.done += amount
            if self._bar is not None:
                self._bar.update(amount)

    def update_to(self, done: int) -> None:
        """Move to ``done`` bytes (a callback's running total); never backwards."""
        with self._lock:
            step = int(done) - self.done
            if step <= 0:
                return
            self.done += step
            if self._bar is not None:
                self._bar.update(step)

    def close(self) -> None:
        with self._lock:
            bar, self._bar = self._bar, None
        if bar is not None:
            bar.close()

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def node_transfers(request: Callable[[dict], dict]) -> Callable[[], TransferRows]:
    """A reader of the incoming transfers of the node a client talks to (``request``: the
    client's request function; the node's ``state`` op, its own report only)."""
    from latticaray.observe.gather import decode_snapshot

    def read() -> TransferRows:
        reply = request({"op": "state", "limit": 1, "remote": False, "timeout": 1.0})
        snap = decode_snapshot(reply["snapshot"])
        return [
            (f"{t.object_id}/{t.peer}", t.bytes_done, t.bytes_total)
            for t in snap.transfers
            if t.direction == "in"
        ]

    return read


class _Monitor:
    """One daemon thread polling every open TransferWatch of the process when it is due, so
    that a get() costs a list insertion, not a thread."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._watches: set[TransferWatch] = set()
        self._thread: threading.Thread | None = None

    def add(self, watch: TransferWatch) -> None:
        with self._cond:
            self._watches.add(watch)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="latticaray-progress", daemon=True
                )
                self._thread.start()
            self._cond.notify()

    def remove(self, watch: TransferWatch) -> None:
        with self._cond:
            self._watches.discard(watch)

    def _run(self) -> None:
        while True:
            with self._cond:
                now = time.monotonic()
                due = [w for w in self._watches if w.next_at <= now]
                if not due:
                    wake = min((w.next_at for w in self._watches), default=None)
                    self._cond.wait(None if wake is None else wake - now)
                    continue
            for watch in due:
                watch.poll()
                watch.next_at = time.monotonic() + watch.interval


_MONITOR = _Monitor()


class TransferWatch:
    """One progress bar over the transfers seen while a blocking call runs.

    Each transfer seen counts with its latest bytes done; one that is gone from the rows
    finished, and counts whole. The bar shows after ``delay`` (quiet for quick calls), reaches
    its total when the call returns normally, and is closed when the call ends either way.
    One thread of the process polls every watch that is due.
    """

    def __init__(
        self,
        read: Callable[[], TransferRows],
        desc: str = "get",
        *,
        delay: float | None = None,
        interval: float = POLL_INTERVAL,
        enabled: bool | None = None,
        file: IO[str] | None = None,
    ) -> None:
        self.read = read
        self.desc = desc
        self.delay = default_delay() if delay is None else max(0.0, delay)
        self.interval = interval
        self.enabled = interactive(file) if enabled is None else enabled
        self.file = file
        self.seen: dict[str, list[int]] = {}  # key -> [done, total]
        self.bar: ProgressBar | None = None
        self.next_at = 0.0
        self._closed = False
        self._lock = threading.Lock()

    def __enter__(self) -> TransferWatch:
        if self.enabled:
            self.next_at = time.monotonic() + self.delay
            _MONITOR.add(self)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        _MONITOR.remove(self)
        with self._lock:  # waits for a poll under way
            self._closed = True
            bar, self.bar = self.bar, None
        if bar is not None:
            if exc_type is None:
                bar.update_to(bar.total)
            bar.close()

    def totals(self) -> tuple[int, int]:
        """(bytes done, bytes total) over every transfer seen so far."""
        return sum(d for d, _ in self.seen.values()), sum(t for _, t in self.seen.values())

    def poll(self) -> None:
        """Read the transfers once and move the bar (the monitor's step; tests call it)."""
        with self._lock:
            if self._closed:
                return
            try:
                rows = list(self.read())
            except Exception:
                return  # the node is busy or going away: the next poll tries again
            current = set()
            for key, done, total in rows:
                current.add(key)
                entry = self.seen.setdefault(key, [0, 0])
                entry[0], entry[1] = max(entry[0], int(done)), max(entry[1], int(total))
            for key, entry in self.seen.items():
                if key not in current:
                    entry[0] = entry[1]  # gone from the rows: finished
            done, total = self.totals()
            if total <= 0:
                return
            if self.bar is None:
                self.bar = ProgressBar(total, self.desc, delay=0.0, enabled=True, file=self.file)
            elif total != self.bar.total:
                self.bar.set_total(total)
            self.bar.update_to(done)
