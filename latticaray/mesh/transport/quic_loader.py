"""Which QUIC library backs the transport: :func:`load_backend` resolves ``QuicConfig.backend``.

Kept apart from :mod:`.quic_backend` (the interface both backends implement) so that each backend
module imports the interface without an import cycle through the loader.
"""

from __future__ import annotations

from .quic_backend import QuicBackend

__all__ = ["BACKENDS", "load_backend"]

#: The backend names ``QuicConfig.backend`` accepts besides "auto", preferred first.
BACKENDS = ("qh3", "aioquic")


def load_backend(name: str) -> QuicBackend:
    """The backend called ``name`` ("auto": qh3 when it imports, else aioquic).

    Raises ImportError when the named library is missing or is not the version its overrides
    were written against, and ValueError for an unknown name."""
    if name == "auto":
        try:
            return load_backend("qh3")
        except ImportError:
            return load_backend("aioquic")
    if name == "qh3":
        from .quic_qh3 import BACKEND as qh3_backend

        return qh3_backend
    if name == "aioquic":
        from .quic_aioquic import BACKEND as aioquic_backend

        return aioquic_backend
    raise ValueError(f"unknown QUIC backend {name!r} (expected 'auto' or one of {BACKENDS})")
