"""Former home of the mesh binding of NAT traversal, now :mod:`.mesh_service`.

Only the old name stays, until ``runtime/`` imports :class:`MeshNatService` from there.
"""

from __future__ import annotations

from .mesh_service import MeshNatService

MeshNat = MeshNatService

__all__ = ["MeshNat"]
