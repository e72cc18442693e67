"""`/latticaray/admit/1` and `/latticaray/renew/1`: a membership credential presented (mutual
admission) or renewed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .fields import (
    MAX_ADMIT_REQUEST,
    MAX_CREDENTIAL,
    Message,
    WireError,
    field_str,
    unpack_map,
)


# ========================================================================== /latticaray/admit/1
@dataclass(slots=True, frozen=True)
class Admit(Message):
    """A membership credential (``lrc1.…``), the request and its reply alike (admit/1, and
    renew/1: the current credential, answered with the renewed one). ``iss`` (in an admit
    reply): the answering node holds the mesh key, so it renews credentials."""

    cred: str
    iss: bool = False

    def to_wire(self) -> dict[str, Any]:
        return {"cred": self.cred, "iss": True} if self.iss else {"cred": self.cred}


def decode_admit(data: bytes) -> Admit:
    """An admission request or reply: at most 4 KiB, a map whose ``cred`` is a string."""
    if len(data) > MAX_ADMIT_REQUEST:
        raise WireError(f"admission message of {len(data)} bytes exceeds {MAX_ADMIT_REQUEST}")
    message = unpack_map(data, "admission")
    return Admit(
        field_str(message, "cred", "admission", MAX_CREDENTIAL), message.get("iss") is True
    )
