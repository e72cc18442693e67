"""latticaray: a Ray-like task and actor runtime over a decentralized peer-to-peer mesh."""

__version__ = "0.1.0"
