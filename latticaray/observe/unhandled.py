"""Task errors nobody retrieved, printed once at the driver (Ray's "Unhandled error").

A task that raised leaves its error in the objects it was to return. When the driver drops its
last ref to such an object without ever having had the error raised by ``get()``, the error
would go unseen: :class:`UnhandledErrors` prints it then, with the remote traceback, on the
driver's stderr — once per distinct error text (a failure that spread to the tasks that took
its result as an argument is shown once). ``LATTICARAY_IGNORE_UNHANDLED_ERRORS=1`` silences it.

The client calls :meth:`UnhandledErrors.raised` with the object ids a ``get()`` raised for and
:meth:`UnhandledErrors.released` when a ref's count reaches zero, with the object's status and
its error value if the driver can see them.

    errors = UnhandledErrors()
    errors.raised([oid])                       # get() raised this one: it was seen
    errors.released(oid, lambda: error_value)  # the last ref is gone: print if never seen
"""

from __future__ import annotations

import hashlib
import os
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import IO

__all__ = ["MAX_REMEMBERED", "UnhandledErrors", "describe"]

#: Object ids whose error get() raised, and texts already printed, each kept at most this many.
MAX_REMEMBERED = 4096
PREFIX = "Unhandled error (suppress with 'LATTICARAY_IGNORE_UNHANDLED_ERRORS=1'): "


def describe(error: object) -> str:
    """The text shown for an error value: a TaskError's own message holds the remote
    traceback; any other exception is shown as its type and message."""
    if isinstance(error, BaseException):
        text = str(error)
        if getattr(error, "remote_traceback", None) is None and (
            type(error).__name__ not in text.split("\n", 1)[0]
        ):
            text = f"{type(error).__name__}: {text}"
        return text
    return repr(error)


class UnhandledErrors:
    """Which errors the driver saw, and printing the ones it never did (thread-safe)."""

    def __init__(self, file: IO[str] | None = None) -> None:
        self.file = file
        self.printed = 0
        self._raised: OrderedDict[bytes, None] = OrderedDict()
        self._shown: OrderedDict[bytes, None] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def enabled() -> bool:
        return os.environ.get("LATTICARAY_IGNORE_UNHANDLED_ERRORS", "") not in ("1", "true")

    def raised(self, oids: Iterable[bytes]) -> None:
        """get() raised the error of these objects (or of one of them): they were seen."""
        with self._lock:
            for oid in oids:
                self._raised[oid] = None
                self._raised.move_to_end(oid)
            while len(self._raised) > MAX_REMEMBERED:
                self._raised.popitem(last=False)

    def released(self, oid: bytes, error: Callable[[], object] | None) -> bool:
        """The driver's last ref to ``oid`` is gone; ``error`` gives its error value (None:
        the object is no error, or its state cannot be seen here). Prints the error if get()
        never raised it; returns whether it printed."""
        with self._lock:
            seen = self._raised.pop(oid, False) is None
        if seen or error is None or not self.enabled():
            return False
        try:
            text = describe(error())
        except Exception as exc:  # an error value that does not load is still an error
            text = f"(the error of object {oid.hex()} could not be read: {exc})"
        digest = hashlib.blake2b(text.encode("utf-8", "replace"), digest_size=16).digest()
        with self._lock:
            if digest in self._shown:
                return False
            self._shown[digest] = None
            while len(self._shown) > MAX_REMEMBERED:
                self._shown.popitem(last=False)
            self.printed += 1
        out = self.file if self.file is not None else sys.stderr
        try:
            print(PREFIX + text, file=out, flush=True)
        except (OSError, ValueError):  # stderr closed at interpreter exit
            return False
        return True
