"""The runtime's side of the mesh: its protocols, their messages and their handlers."""
