"""The storage engine: L1 pool, eviction policies, L2 adapters behind per-adapter serde, and the Store."""
