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
"""

from __future__ import annotations

import os
import sys
import threading
import warnings
from types import TracebackType
from typing import IO, Any

__all__ = ["ProgressBar", "in_notebook", "interactive"]

DEFAULT_DELAY = 1.0


def in_notebook() -> bool:
    """True inside a Jupyter kernel (what tqdm.auto turns into a widget)."""
    if "ipykernel" not in sys.modules:
        return False
    ipython = sys.modules.get("IPython")
    get = getattr(ipython, "get_ipython", None)
    shell = get() if get is not None else None
    return shell is not None and "zmq" in type(shell).__name__.lower()


def interactive(stream: IO[str] | None = None) -> bool:
    """Whether a progress bar would be seen: ``LATTICARAY_PROGRESS``, a notebook, or a TTY."""
    forced = os.environ.get("LATTICARAY_PROGRESS", "").strip()
    if forced in ("0", "false", "no", "off"):
        return False
    if forced in ("1", "true", "yes", "on"):
        return True
    if in_notebook():
        return True
    stream = stream if stream is not None else sys.stderr
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
        delay: float = DEFAULT_DELAY,
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
                "delay": max(0.0, delay),
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
