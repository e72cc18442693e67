"""A worker process's stdout and stderr, captured line by line for the driver that owns the task.

:class:`OutputCapture` replaces ``sys.stdout``/``sys.stderr`` with text streams that tag each
line with the task (or actor) running in the writing thread, and (``capture_fds``) points file
descriptors 1 and 2 at pipes read by a thread, so output written below Python (C extensions,
subprocesses) is captured too, tagged with the task running when it is read (``pipe_context``,
or the process-wide context). ``context`` may name the writing thread's task (a context
variable) when ``set_context`` is not used. Lines are grouped
by :class:`~latticaray.observe.logs.LogBatcherCore` and handed to ``send`` from a flusher
thread, at the latest ``interval`` after they were written, and at once by :meth:`flush`
(called when a task ends, so its lines leave before its result). ``send`` is called without
any of the capture's locks held; it must be thread-safe.

With ``echo`` the lines are also written to the process's original stdout/stderr.
"""

from __future__ import annotations

import codecs
import fcntl
import io
import os
import sys
import termios
import threading
import time
from collections.abc import Callable
from typing import IO, Any

from latticaray.observe.logs import (
    FLUSH_INTERVAL,
    STDERR,
    STDOUT,
    LogBatch,
    LogBatcherCore,
    LogContext,
    split_lines,
)

__all__ = ["OutputCapture"]

_NO_CONTEXT = LogContext(name="worker")


class _TaggedStream(io.TextIOBase):
    """A text stream whose complete lines go to the capture with the writer's context."""

    def __init__(self, capture: OutputCapture, stream: int, original: IO[str] | None) -> None:
        super().__init__()
        self._capture = capture
        self._stream = stream
        self._original = original
        self._pending = threading.local()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return "utf-8"

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        if self._original is None:
            raise io.UnsupportedOperation("fileno")
        return self._original.fileno()

    def write(self, text: str) -> int:
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        pending = getattr(self._pending, "text", "")
        lines, rest = split_lines(pending, text)
        self._pending.text = rest
        if lines:
            self._capture.lines(self._stream, lines)
        return len(text)

    def flush(self) -> None:
        pending = getattr(self._pending, "text", "")
        if pending:
            self._pending.text = ""
            self._capture.lines(self._stream, [pending])


class OutputCapture:
    """Captures a worker's output and sends it in batches tagged with the running task."""

    def __init__(
        self,
        node: str,
        send: Callable[[LogBatch], None],
        *,
        pid: int | None = None,
        capture_fds: bool = True,
        echo: bool = False,
        interval: float = FLUSH_INTERVAL,
        context: Callable[[], LogContext | None] | None = None,
        pipe_context: Callable[[], LogContext | None] | None = None,
    ) -> None:
        self._send = send
        self._context_fn = context
        self._pipe_context_fn = pipe_context
        self._core = LogBatcherCore(node, os.getpid() if pid is None else pid, interval)
        self._capture_fds = capture_fds
        self._echo = echo
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._local = threading.local()
        self._context = _NO_CONTEXT
        self._stopped = False
        self._threads: list[threading.Thread] = []
        self._saved_fds: dict[int, int] = {}
        self._saved_streams: tuple[Any, Any] | None = None
        self._echo_files: dict[int, IO[str]] = {}
        self._piped: list[int] = []  # descriptors whose output a reader thread reads
        self._pipe_reads: dict[int, int] = {}  # descriptor -> the pipe's read end
        self._busy = 0  # readers holding bytes they read but have not handed over yet
        self._reads = 0  # reads from the pipes (the readers count them)
        self._reads_flushed = 0  # ... as of the last flush
        self._marks: dict[str, threading.Event] = {}
        self._flush_context: LogContext | None = None
        self._mark_seq = 0

    # --- context --------------------------------------------------------------------------------

    def set_context(self, context: LogContext | None, *, thread_only: bool = False) -> None:
        """The task now running (None: none). ``thread_only``: for this thread alone."""
        if thread_only:
            self._local.context = context
        else:
            self._local.context = None
            self._context = context or _NO_CONTEXT

    def _current(self) -> LogContext:
        local = getattr(self._local, "context", None)
        if local is not None:
            return local
        if self._context_fn is not None:
            found = self._context_fn()
            if found is not None:
                return found
        return self._context

    # --- lifecycle ------------------------------------------------------------------------------

    def start(self) -> OutputCapture:
        for fd in (1, 2):
            try:
                self._saved_fds[fd] = os.dup(fd)
            except OSError:
                pass
        if self._echo:
            for fd, saved in self._saved_fds.items():
                self._echo_files[fd] = open(
                    os.dup(saved), "w", encoding="utf-8", errors="replace", closefd=True
                )
        if self._capture_fds:
            for fd, stream in ((1, STDOUT), (2, STDERR)):
                if fd not in self._saved_fds:
                    continue
                read_end, write_end = os.pipe()
                os.dup2(write_end, fd)
                os.close(write_end)
                self._piped.append(fd)
                self._pipe_reads[fd] = read_end
                reader = threading.Thread(
                    target=self._read_fd,
                    args=(read_end, stream),
                    name=f"latticaray-capture-{fd}",
                    daemon=True,
                )
                reader.start()
                self._threads.append(reader)
        self._saved_streams = (sys.stdout, sys.stderr)
        sys.stdout = _TaggedStream(self, STDOUT, self._echo_files.get(1))
        sys.stderr = _TaggedStream(self, STDERR, self._echo_files.get(2))
        flusher = threading.Thread(target=self._flush_loop, name="latticaray-capture", daemon=True)
        flusher.start()
        self._threads.append(flusher)
        return self

    def stop(self) -> None:
        """Restore the streams and descriptors, and send what is left."""
        if self._saved_streams is not None:
            for stream in (sys.stdout, sys.stderr):
                if isinstance(stream, _TaggedStream):
                    stream.flush()
            sys.stdout, sys.stderr = self._saved_streams
            self._saved_streams = None
        for fd, saved in self._saved_fds.items():
            os.dup2(saved, fd)  # closes the pipe's write end: the readers see EOF
            os.close(saved)
        self._saved_fds.clear()
        self._piped.clear()
        with self._wake:
            self._stopped = True
            self._wake.notify_all()
        for thread in self._threads:
            thread.join(2.0)
        self._threads.clear()
        self.flush()
        for f in self._echo_files.values():
            f.close()
        self._echo_files.clear()

    # --- lines ----------------------------------------------------------------------------------

    def lines(self, stream: int, lines: list[str], context: LogContext | None = None) -> None:
        """Complete lines written by the current thread (or under ``context``)."""
        context = context or self._current()
        now = time.monotonic()
        with self._wake:
            full: list[LogBatch] = []
            for text in lines:
                full.extend(self._core.add(context, stream, text, now))
            self._wake.notify()
        echo = self._echo_files.get(1 if stream == STDOUT else 2)
        if echo is not None:
            try:
                echo.write("".join(t + "\n" for t in lines))
                echo.flush()
            except (OSError, ValueError):
                pass
        self._deliver(full)

    def flush(self, fd_timeout: float = 1.0) -> None:
        """Send every line written so far (Python-level buffers and the pipes included) now.

        A marker written to each captured descriptor and seen by its reader proves that what
        was written below Python before the call has been read (within ``fd_timeout``).
        """
        for stream in (sys.stdout, sys.stderr):
            if isinstance(stream, _TaggedStream):
                stream.flush()
        waits = []
        pipes = self._unread_pipes()
        if pipes:  # what the readers read up to the marker is the flushing thread's task's
            self._flush_context = self._current()
        for fd in pipes:
            with self._wake:
                self._mark_seq += 1
                mark = f"\x00latticaray-flush-{os.getpid()}-{self._mark_seq}\x00"
                seen = self._marks[mark] = threading.Event()
            try:
                os.write(fd, mark.encode() + b"\n")
            except OSError:
                self._marks.pop(mark, None)
                continue
            waits.append((mark, seen))
        deadline = time.monotonic() + fd_timeout
        for mark, seen in waits:
            seen.wait(max(0.0, deadline - time.monotonic()))
            self._marks.pop(mark, None)
        self._flush_context = None
        with self._wake:
            batches = self._core.flush()
        self._deliver(batches)

    def _unread_pipes(self) -> list[int]:
        """Captured descriptors that may hold output not handed over yet: bytes in the pipe,
        or read since the last flush (most flushes find none and skip the marker)."""
        if not self._piped:
            return []
        reads, self._reads_flushed = self._reads_flushed, self._reads
        if self._busy or reads != self._reads_flushed:
            return list(self._piped)
        pending = []
        for fd in self._piped:
            try:
                waiting = fcntl.ioctl(self._pipe_reads[fd], termios.FIONREAD, b"\0\0\0\0")
            except (OSError, KeyError):
                pending.append(fd)
                continue
            if int.from_bytes(waiting, sys.byteorder):
                pending.append(fd)
        return pending

    def _deliver(self, batches: list[LogBatch]) -> None:
        for batch in batches:
            try:
                self._send(batch)
            except Exception:
                pass  # the node is gone: nobody to print for

    def _flush_loop(self) -> None:
        while True:
            with self._wake:
                if self._stopped:
                    return
                deadline = self._core.deadline()
                wait = None if deadline is None else max(0.0, deadline - time.monotonic())
                if wait is None or wait > 0:
                    self._wake.wait(wait)
                batches = self._core.due(time.monotonic())
            self._deliver(batches)

    def _reader_context(self) -> LogContext:
        """Output read from a pipe belongs to the task running when it is read (or, during a
        flush, to the flushing thread's task)."""
        flushing = self._flush_context
        if flushing is not None and flushing is not _NO_CONTEXT:
            return flushing
        if self._pipe_context_fn is not None:
            found = self._pipe_context_fn()
            if found is not None:
                return found
        return self._context

    def _take_marks(self, lines: list[str]) -> list[str]:
        """The lines without flush markers; each marker seen is signalled."""
        if not self._marks:
            return lines
        out = []
        for line in lines:
            for mark, seen in list(self._marks.items()):
                if line.endswith(mark):
                    line = line[: -len(mark)]
                    seen.set()
                    break
            else:
                out.append(line)
                continue
            if line:
                out.append(line)  # a partial line the marker ended
        return out

    def _read_fd(self, fd: int, stream: int) -> None:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        pending = ""
        try:
            while True:
                try:
                    data = os.read(fd, 65536)
                except InterruptedError:
                    continue
                except OSError:
                    break
                self._reads += 1
                if not data:
                    break
                self._busy += 1
                try:
                    lines, pending = split_lines(pending, decoder.decode(data))
                    if lines:
                        self.lines(stream, self._take_marks(lines), self._reader_context())
                finally:
                    self._busy -= 1
        finally:
            tail = pending + decoder.decode(b"", final=True)
            if tail:
                self.lines(stream, [tail], self._reader_context())
            os.close(fd)
