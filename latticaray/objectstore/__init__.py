"""Object store: CIDs, serialization, shared-memory store, eviction/spill, Bitswap exchange."""
