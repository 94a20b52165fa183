"""The paged KV cache: block hashes, the block pool, and the per-request manager."""
