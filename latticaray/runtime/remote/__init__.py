"""The remote side of a runtime node: what crosses to other nodes of the mesh (see runtime.py);
the typed messages of its protocols are the wire/ package."""
