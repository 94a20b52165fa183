"""Per-request block tables over the block pool: prefix lookups, allocation, forks and frees.

A request's table (block ids) only grows while it runs (append-only); it is dropped whole when the
request finishes or is preempted. The engine reads `tables` directly every step: treat them as
read-only outside this class. Shared blocks are never written: a write into a block held by another
sequence first copies it (copy-on-write), and the runner performs the queued copies before the
step's forward pass.
"""
from __future__ import annotations

from tandem.engine.kv_cache.block_hash import chain_seed, extend_hashes
from tandem.engine.kv_cache.block_pool import Block, BlockPool
from tandem.engine.request import Request


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool, hash_seed: str) -> None:
        self.block_size = block_size
        self.hash_seed = hash_seed
        self.lora_keys: dict[str, str] = {}  # adapter name -> its key (lora.py), set by the engine
        self.enable_caching = enable_caching
        self.pool = BlockPool(num_blocks, enable_caching)
        self.tables: dict[str, list[int]] = {}  # seq_id -> block ids, in token order
        self._num_hashed: dict[str, int] = {}  # blocks of each table already published
        self.pending_copies: list[tuple[int, int]] = []  # (src, dst) for the next forward pass
        self.prefix_queries = 0  # tokens looked up
        self.prefix_hits = 0  # tokens found

    def seed_of(self, lora: str | None) -> str:
        if lora is not None and lora not in self.lora_keys:
            raise ValueError(f"lora: unknown LoRA adapter {lora!r}")
        return chain_seed(self.hash_seed, None if lora is None else self.lora_keys[lora])

    def block_ids(self, req: Request) -> list[int]:
        """A copy of the request's table."""
        return list(self.tables.get(req.seq_id, ()))

    def _blocks(self, ids) -> list[Block]:
        blocks = self.pool.blocks
        return [blocks[i] for i in ids]

    def _hashes(self, req: Request) -> list[int]:
        tokens = req.all_token_ids
        if req.num_ahead:  # placeholders (lookaheads.py) are hashed once their tokens are known
            tokens = tokens[:len(tokens) - req.num_ahead]
        extend_hashes(req.block_hashes, tokens, self.block_size, self.seed_of(req.params.lora))
        return req.block_hashes

    def computed_prefix(self, req: Request) -> list[Block]:
        """Cached blocks holding a prefix of the request (never its last token: it needs logits)."""
        if not self.enable_caching or req.params.prompt_logprobs is not None:
            return []
        max_blocks = (req.num_tokens - 1) // self.block_size
        hit: list[Block] = []
        for h in self._hashes(req)[:max_blocks]:
            block = self.pool.lookup(h)
            if block is None:
                break
            hit.append(block)
        self.prefix_queries += req.num_tokens
        self.prefix_hits += len(hit) * self.block_size
        return hit

    def allocate(self, req: Request, num_new_tokens: int, prefix: list[Block] = (), publish: bool = True) -> bool:
        """Room for `num_new_tokens` more tokens (after `prefix`, for a request not yet running).
        `publish=False` keeps the new blocks out of the prefix cache (their KV arrives later)."""
        bs = self.block_size
        table = self.tables.get(req.seq_id)
        if table is not None and not prefix:  # a running request: most steps need no new block
            computed = req.num_computed_tokens
            end = computed + num_new_tokens
            if end <= len(table) * bs and self.pool.blocks[table[computed // bs]].ref_cnt == 1:
                if publish and self.enable_caching:
                    self.publish(req, end)
                return True
        table = table if table is not None else []
        computed = req.num_computed_tokens + len(prefix) * bs
        needed = -(-(computed + num_new_tokens) // bs) - len(table) - len(prefix)
        write_block = computed // bs
        cow = write_block < len(table) and self.pool.blocks[table[write_block]].ref_cnt > 1
        reviving = sum(1 for b in prefix if b.ref_cnt == 0)
        if max(needed, 0) + cow + reviving > self.pool.num_free:
            return False
        if prefix:
            self.pool.touch(list(prefix))
            table = [b.block_id for b in prefix]
            self.tables[req.seq_id] = table
            self._num_hashed[req.seq_id] = len(prefix)
        elif req.seq_id not in self.tables:
            self.tables[req.seq_id] = table
            self._num_hashed[req.seq_id] = 0
        if cow:
            old = table[write_block]
            (new,) = self.pool.allocate(1)
            self.pending_copies.append((old, new.block_id))
            self.pool.free([self.pool.blocks[old]])
            table[write_block] = new.block_id
        if needed > 0:
            table.extend(b.block_id for b in self.pool.allocate(needed))
        if publish:
            self.publish(req, computed + num_new_tokens)
        return True

    def has_table(self, req: Request) -> bool:
        return req.seq_id in self.tables

    def publish(self, req: Request, num_tokens: int) -> None:
        """Cache the blocks this step fills (their KV is written in the same forward pass, before
        any attention reads it, so a request scheduled alongside may already reuse them)."""
        if not self.enable_caching:
            return
        table = self.tables[req.seq_id]
        full = min(num_tokens // self.block_size, len(table))
        start = self._num_hashed[req.seq_id]
        if full <= start:
            return
        hashes = self._hashes(req)
        full = min(full, len(hashes))
        for i in range(start, full):
            self.pool.cache(self.pool.blocks[table[i]], hashes[i])
        self._num_hashed[req.seq_id] = full

    def fork(self, parent: Request, child: Request) -> None:
        """The child shares every block of the parent; writes into shared blocks copy first."""
        table = self.tables[parent.seq_id]
        self.pool.touch(self._blocks(table))
        self.tables[child.seq_id] = list(table)
        self._num_hashed[child.seq_id] = self._num_hashed[parent.seq_id]
        child.block_hashes = list(parent.block_hashes)

    def free(self, req: Request) -> None:
        """Release a request's blocks, tail first, so its prefix outlives its suffix in the cache."""
        table = self.tables.pop(req.seq_id, None)
        self._num_hashed.pop(req.seq_id, None)
        if table:
            self.pool.free(self._blocks(reversed(table)))

    def take_copies(self) -> list[tuple[int, int]]:
        copies, self.pending_copies = self.pending_copies, []
        return copies
