"""The cluster-wide prefix KV store (`tandem kvstore`): KV blocks by hash, shared by every worker
of a deployment, so a prompt prefix computed once anywhere can be loaded instead of recomputed.

Keys: a block is filed under (compat_hash, block_hash). The compatibility hash of the writer's KV
layout (model fingerprint, layers, KV heads, head size, dtype, block size, memory layout, TP size)
is a namespace: blocks of different models or layouts never collide, and a reader asks with its
own compat_hash so it can only get blocks that fit its cache. The block hash is the engine's
chained hash (tandem/engine/kv_cache/block_hash.py), so equal hashes mean equal prefixes.

The life of a block:

1. Put. The payload's CRC-32 is checked against the request's (a mismatch is refused with
   INVALID_ARGUMENT); a block larger than the DRAM tier is refused (RESOURCE_EXHAUSTED). The block
   enters DRAM as the most recently used. If it was new, a STORED event goes to subscribers.
2. DRAM. A hard byte limit: each insert evicts the least recently used blocks until the total fits.
   A Get refreshes recency; Exists does not (router probes must not keep blocks alive).
3. Spill. With a disk tier, a block evicted from DRAM is written to `DISK_DIR/COMPAT/HASH.kvb`
   (header with magic, CRC-32 and length, then the payload; written to a temporary name and
   renamed). Tiers are exclusive: the block now counts against the disk capacity only. A spill is
   not an event: the store still holds the block.
4. Disk. Its own hard byte limit and LRU order. A Get of a disk block reads the file and checks
   it: an intact block is promoted back into DRAM (the file is deleted; promoting may spill other
   blocks); a corrupt or unreadable file is deleted, counted (`tandem:kvstore_corrupt_reads`) and
   answered as not found.
5. Removed. A block evicted from the last tier it was in (DRAM without a disk tier, or disk), or
   dropped as corrupt, is gone: a REMOVED event tells subscribers. A restarted store adopts the
   block files its disk directory still holds (their checksums are checked when read) and starts
   with an empty DRAM tier.

Modules: sizes (byte sizes with suffixes), tiers (the DRAM and disk LRU maps), events (the change
feed to Events streams), store (operations, counters, the lock), service (gRPC), metrics
(`tandem:kvstore_*`), main (`tandem kvstore`, the process).
"""
