"""Worker output at the driver, like Ray's ``log_to_driver``: the wire batch and the two cores.

A worker's stdout/stderr lines travel to the driver that owns the task producing them:

    worker process     capture.py OutputCapture: lines tagged with the running task
        │  LogBatcherCore: batches per task, at most 256 lines, at least every 100 ms
    its node           sets the batch's owner (the node that submitted the task) and
        │              forwards it there (members-only RPC), or prints it if that is itself
        │
    owner's driver     LogDedupCore: per-source rate limit, cross-source deduplication
                       LogPrinter: a thread writing to the driver's stdout / stderr

Lines are printed with Ray's prefix, ``(name pid=1234, node=host) text``. A source (one worker
process) may print ``rate`` lines per second with bursts of ``burst``; lines beyond that are
dropped and counted, and one line says how many. The same line (words with digits masked) from
several sources within ``window`` seconds is printed once, then once more with
``[repeated Nx across cluster]`` when the window closes. Lines of one source are never merged.

The cores are sans-I/O (``now`` passed in, actions returned); the batch's codec checks every
field and bound (:class:`LogDecodeError`).
"""

from __future__ import annotations

import contextvars
import math
import re
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Any

import msgpack

from latticaray.observe import metrics

__all__ = [
    "STDERR",
    "STDOUT",
    "LogBatch",
    "LogBatcherCore",
    "LogContext",
    "LogDecodeError",
    "LogDedupCore",
    "LogPrinter",
    "Output",
    "split_lines",
]

STDOUT = 1
STDERR = 2
MAX_LINE = 4096  # characters; longer lines are split
MAX_BATCH_LINES = 256
MAX_BATCH_BYTES = 256 << 10
FLUSH_INTERVAL = 0.1
NOTICE_INTERVAL = 1.0  # at most one "lines dropped" notice per source per second
MAX_NAME = 256


class LogDecodeError(ValueError):
    """A log batch from the network did not have the shape or bounds it must have."""


@dataclass(frozen=True, slots=True)
class LogContext:
    """Who printed: the task or actor call running in the worker."""

    name: str  # task function or actor class (Ray's prefix)
    task_id: str = ""  # hex; "" outside any task


@dataclass(frozen=True, slots=True)
class LogBatch:
    """Lines one worker printed while running one task, in order."""

    owner: str  # the node whose driver the lines are for ("" until the worker's node sets it)
    task_id: str
    node: str  # the producing node's name, for the prefix
    pid: int
    name: str
    lines: tuple[tuple[int, str], ...]  # (STDOUT | STDERR, text without newline)

    def encode(self) -> bytes:
        return msgpack.packb(
            [
                self.owner,
                self.task_id,
                self.node,
                self.pid,
                self.name,
                [list(x) for x in self.lines],
            ],
            use_bin_type=True,
        )

    @classmethod
    def decode(cls, data: bytes) -> LogBatch:
        if len(data) > MAX_BATCH_BYTES + 64 * MAX_BATCH_LINES + 4 * MAX_NAME:
            raise LogDecodeError(f"log batch of {len(data)} bytes is too large")
        try:
            parts = msgpack.unpackb(
                data,
                raw=False,
                max_str_len=MAX_LINE * 4,
                max_bin_len=0,
                max_array_len=MAX_BATCH_LINES,
                max_map_len=0,
                max_ext_len=0,
            )
        except Exception as exc:
            raise LogDecodeError(f"log batch is not valid msgpack: {exc}") from None
        if not isinstance(parts, list) or len(parts) < 6:
            raise LogDecodeError("log batch must be [owner, task_id, node, pid, name, lines]")
        owner, task_id, node, pid, name, lines = parts[:6]
        for label, value in (
            ("owner", owner),
            ("task_id", task_id),
            ("node", node),
            ("name", name),
        ):
            if not isinstance(value, str) or len(value) > MAX_NAME:
                raise LogDecodeError(f"log batch {label} must be a string of at most {MAX_NAME}")
        if not isinstance(pid, int) or isinstance(pid, bool) or not 0 <= pid < 2**32:
            raise LogDecodeError("log batch pid must be a non-negative integer")
        if not isinstance(lines, list):
            raise LogDecodeError("log batch lines must be an array")
        checked = []
        for item in lines:
            if (
                not isinstance(item, list)
                or len(item) != 2
                or item[0] not in (STDOUT, STDERR)
                or not isinstance(item[1], str)
                or len(item[1]) > MAX_LINE
            ):
                raise LogDecodeError("a log line must be [1 or 2, text of at most 4096]")
            checked.append((item[0], item[1]))
        return cls(owner, task_id, node, pid, name, tuple(checked))


def split_lines(pending: str, data: str) -> tuple[list[str], str]:
    """Complete lines of ``pending + data`` (split at MAX_LINE too) and what is left over."""
    text = pending + data
    parts = text.split("\n")
    rest = parts.pop()
    lines: list[str] = []
    for part in parts:
        part = part.rstrip("\r")
        while len(part) > MAX_LINE:
            lines.append(part[:MAX_LINE])
            part = part[MAX_LINE:]
        lines.append(part)
    while len(rest) > MAX_LINE:
        lines.append(rest[:MAX_LINE])
        rest = rest[MAX_LINE:]
    return lines, rest


class LogBatcherCore:
    """Groups a worker's lines into batches per task; sans-I/O.

    ``add`` returns the batches that became full; ``due(now)`` those whose oldest line waited
    ``interval``; ``flush()`` everything (at the end of a task).
    """

    def __init__(
        self, node: str, pid: int, interval: float = FLUSH_INTERVAL, max_lines: int = 256
    ) -> None:
        self.node = node[:MAX_NAME]
        self.pid = pid
        self.interval = interval
        self.max_lines = max(1, min(max_lines, MAX_BATCH_LINES))
        self._open: dict[tuple[str, str], tuple[float, list[tuple[int, str]], int]] = {}

    def add(self, context: LogContext, stream: int, text: str, now: float) -> list[LogBatch]:
        key = (context.task_id[:MAX_NAME], context.name[:MAX_NAME])
        first, lines, size = self._open.get(key, (now, [], 0))
        lines.append((stream, text[:MAX_LINE]))
        size += len(text) + 8
        if len(lines) >= self.max_lines or size >= MAX_BATCH_BYTES // 4:
            self._open.pop(key, None)
            return [self._batch(key, lines)]
        self._open[key] = (first, lines, size)
        return []

    def deadline(self) -> float | None:
        if not self._open:
            return None
        return min(first for first, _, _ in self._open.values()) + self.interval

    def due(self, now: float) -> list[LogBatch]:
        ready = [k for k, (first, _, _) in self._open.items() if now - first >= self.interval]
        return [self._batch(k, self._open.pop(k)[1]) for k in ready]

    def flush(self) -> list[LogBatch]:
        batches = [self._batch(k, lines) for k, (_, lines, _) in self._open.items()]
        self._open.clear()
        return batches

    def _batch(self, key: tuple[str, str], lines: list[tuple[int, str]]) -> LogBatch:
        return LogBatch("", key[0], self.node, self.pid, key[1], tuple(lines))


@dataclass(frozen=True, slots=True)
class Output:
    """One line to print at the driver."""

    stream: int
    text: str


_DIGITS = re.compile(r"\S*\d\S*")


def _pattern(text: str) -> str:
    return _DIGITS.sub("*", text)


@dataclass
class _Source:
    tokens: float
    stamp: float
    dropped: int = 0
    noticed: float = -math.inf  # when the last "lines dropped" notice went out


@dataclass
class _Seen:
    first: float
    prefix: str
    stream: int
    text: str
    sources: set[tuple[str, int]] = field(default_factory=set)
    repeats: int = 0


def format_prefix(name: str, pid: int, node: str) -> str:
    return f"({name} pid={pid}, node={node})"


class LogDedupCore:
    """The driver's side: rate limit per source, deduplicate across sources; sans-I/O."""

    def __init__(
        self,
        *,
        rate: float = 100.0,
        burst: int = 1000,
        window: float = 5.0,
        dedup: bool = True,
        max_patterns: int = 10_000,
        max_sources: int = 10_000,
    ) -> None:
        self.rate = rate
        self.burst = burst
        self.window = window
        self.dedup = dedup
        self.max_patterns = max_patterns
        self.max_sources = max_sources
        self._sources: dict[tuple[str, int], _Source] = {}
        self._seen: dict[str, _Seen] = {}
        self._printed = metrics.LOG_LINES.labels("printed")
        self._deduplicated = metrics.LOG_LINES.labels("deduplicated")
        self._dropped = metrics.LOG_LINES.labels("dropped")

    def receive(self, batch: LogBatch, now: float) -> list[Output]:
        key = (batch.node, batch.pid)
        source = self._sources.get(key)
        if source is None:
            if len(self._sources) >= self.max_sources:
                self._sources.pop(next(iter(self._sources)))
            source = self._sources[key] = _Source(tokens=float(self.burst), stamp=now)
        source.tokens = min(float(self.burst), source.tokens + (now - source.stamp) * self.rate)
        source.stamp = now
        prefix = format_prefix(batch.name, batch.pid, batch.node)
        out: list[Output] = []
        for stream, text in batch.lines:
            if source.tokens < 1.0:
                source.dropped += 1
                self._dropped.add()
                continue
            source.tokens -= 1.0
            if self.dedup and text.strip():
                pattern = _pattern(text)
                seen = self._seen.get(pattern)
                if seen is not None and now - seen.first < self.window:
                    if key not in seen.sources:
                        seen.sources.add(key)
                        seen.repeats += 1
                        self._deduplicated.add()
                        continue
                elif len(self._seen) < self.max_patterns:
                    self._seen[pattern] = _Seen(now, prefix, stream, text, {key})
            out.append(Output(stream, f"{prefix} {text}"))
            self._printed.add()
        return out

    def deadline(self) -> float | None:
        times = [s.first + self.window for s in self._seen.values()]
        times.extend(s.noticed + NOTICE_INTERVAL for s in self._sources.values() if s.dropped)
        return min(times) if times else None

    def poll(self, now: float) -> list[Output]:
        """Summaries whose time came: repeated lines, and how many lines the limit dropped."""
        out: list[Output] = []
        for pattern, seen in list(self._seen.items()):
            if now - seen.first >= self.window:
                del self._seen[pattern]
                if seen.repeats:
                    out.append(
                        Output(
                            seen.stream,
                            f"{seen.prefix} {seen.text} [repeated {seen.repeats}x across cluster]",
                        )
                    )
        for (node, pid), source in self._sources.items():
            if source.dropped and now - source.noticed >= NOTICE_INTERVAL:
                source.noticed = now
                out.append(
                    Output(
                        STDERR,
                        f"(pid={pid}, node={node}) [{source.dropped} lines dropped: "
                        f"over {self.rate:g} lines/s]",
                    )
                )
                source.dropped = 0
        return out

    def close(self) -> list[Output]:
        """Everything still held back (at shutdown)."""
        return self.poll(math.inf)


class WholeLines:
    """A text stream seen through a lock: each thread's writes reach the stream a whole line at
    a time (a partial line waits for its newline or a flush), so the lines the printer writes
    from another thread never land inside a line the user is printing (``print`` makes several
    writes). Everything else is the wrapped stream's."""

    def __init__(self, stream: IO[str], lock: threading.RLock) -> None:
        self.stream = stream
        self._lock = lock
        self._partial = threading.local()

    def write(self, text: str) -> int:
        held = getattr(self._partial, "text", "") + text
        head, newline, tail = held.rpartition("\n")
        self._partial.text = tail
        if newline:
            with self._lock:
                self.stream.write(head + newline)
        return len(text)

    def flush(self) -> None:
        held = getattr(self._partial, "text", "")
        with self._lock:
            if held:
                self._partial.text = ""
                self.stream.write(held)
            self.stream.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


class LogPrinter:
    """Prints batches at the driver: at once, in the thread that submits them (the node's loop,
    so a task's lines are written before the reply that follows them on the same connection
    is handled, and a notebook shows them in the cell that ran the task); the summaries the
    core holds back come from a thread of its own when their time comes.

    ``submit`` may be called from any thread; writes are serialised by a lock.
    """

    def __init__(
        self,
        core: LogDedupCore | None = None,
        *,
        stdout: IO[str] | None = None,
        stderr: IO[str] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.core = core or LogDedupCore()
        self._stdout = stdout
        self._stderr = stderr
        self._clock = clock
        self._thread: threading.Thread | None = None
        self._lock = threading.RLock()
        self._wake = threading.Condition(self._lock)
        self._stopped = False
        self._installed: list[tuple[str, WholeLines]] = []

    def start(self) -> LogPrinter:
        with self._lock:
            if self._thread is None:
                self._guard_streams()
                self._thread = threading.Thread(
                    target=self._run, name="latticaray-log-printer", daemon=True
                )
                self._thread.start()
        return self

    def _guard_streams(self) -> None:
        """Writing to this process's own stdout/stderr: see them through :class:`WholeLines`
        (sharing this printer's lock) until :meth:`stop`."""
        for name, given in (("stdout", self._stdout), ("stderr", self._stderr)):
            current = getattr(sys, name)
            if given is None and current is not None and not isinstance(current, WholeLines):
                guarded = WholeLines(current, self._lock)
                setattr(sys, name, guarded)
                self._installed.append((name, guarded))

    def _unguard_streams(self) -> None:
        for name, guarded in self._installed:
            guarded.flush()
            if getattr(sys, name) is guarded:  # not swapped again by someone else meanwhile
                setattr(sys, name, guarded.stream)
        self._installed.clear()

    def submit(self, batch: LogBatch) -> bool:
        with self._wake:
            if self._stopped:
                return False
            # written from an empty context: a notebook kernel then shows the lines in the cell
            # running now, not the one whose context the node's tasks inherited (init()'s)
            contextvars.Context().run(self._write, self.core.receive(batch, self._clock()))
            self._wake.notify()
        return True

    def stop(self, timeout: float = 5.0) -> None:
        """Print what the core holds back, then end the thread."""
        with self._wake:
            if self._stopped:
                return
            self._stopped = True
            self._write(self.core.close())
            self._unguard_streams()
            self._wake.notify()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)

    def _write(self, outputs: list[Output]) -> None:
        for out in outputs:
            stream: Any = (
                (self._stdout or sys.stdout)
                if out.stream == STDOUT
                else (self._stderr or sys.stderr)
            )
            if isinstance(stream, WholeLines):
                stream = stream.stream  # a whole line already; the lock is held
            try:
                stream.write(out.text + "\n")
            except (OSError, ValueError):
                pass
        if outputs:
            for stream in {self._stdout or sys.stdout, self._stderr or sys.stderr}:
                try:
                    stream.flush()
                except (OSError, ValueError):
                    pass

    def _run(self) -> None:
        with self._wake:
            while not self._stopped:
                deadline = self.core.deadline()
                wait = None if deadline is None else max(0.0, deadline - self._clock())
                if wait is None or wait > 0:
                    self._wake.wait(wait)
                if not self._stopped:
                    self._write(self.core.poll(self._clock()))
