"""The block pool: every KV block, its reference count, the free queue and the prefix-cache map.

Lifecycle of a block: free (in the queue, maybe still holding a cached prefix) -> allocated
(ref_cnt >= 1, out of the queue) -> freed by its last holder (back to the queue's tail, keeping its
hash so a later request can reuse it) -> evicted (taken from the queue's head for new data; its
hash is dropped then). The queue is in LRU order, so cached prefixes are evicted oldest first.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from tandem.engine.kv_cache.block_hash import BlockHash
from tandem.engine.kv_cache.events import KVEventLog


@dataclass(eq=False)
class Block:
    block_id: int
    ref_cnt: int = 0
    block_hash: BlockHash | None = None  # set once the block is full and cached


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool) -> None:
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least 1 block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, Block] = OrderedDict((b.block_id, b) for b in self.blocks)
        self._cached: dict[BlockHash, Block] = {}
        self.events: KVEventLog | None = None  # set by a worker that reports its cache to a router

    @property
    def num_free(self) -> int:
        return len(self._free)

    def usage(self) -> float:
        return 1.0 - self.num_free / self.num_blocks

    def allocate(self, n: int) -> list[Block]:
        if n > len(self._free):
            raise MemoryError(f"asked for {n} KV blocks, {len(self._free)} free")
        out = []
        for _ in range(n):
            _, block = self._free.popitem(last=False)
            if block.block_hash is not None:  # evict the cached prefix it held
                if self._cached.get(block.block_hash) is block:
                    del self._cached[block.block_hash]
                    if self.events is not None:
                        self.events.removed(block.block_hash)
                block.block_hash = None
            block.ref_cnt = 1
            out.append(block)
        return out

    def lookup(self, block_hash: BlockHash) -> Block | None:
        return self._cached.get(block_hash)

    def touch(self, blocks: list[Block]) -> None:
        """Take a reference on blocks found in the prefix cache (reviving free ones)."""
        for block in blocks:
            if block.ref_cnt == 0:
                del self._free[block.block_id]
            block.ref_cnt += 1

    def free(self, blocks: list[Block]) -> None:
        """Drop one reference on each; blocks nobody holds return to the queue's tail."""
        for block in blocks:
            block.ref_cnt -= 1
            assert block.ref_cnt >= 0, f"block {block.block_id} freed twice"
            if block.ref_cnt == 0:
                if block.block_hash is None:
                    self._free[block.block_id] = block
                    self._free.move_to_end(block.block_id, last=False)  # uncached: reuse first
                else:
                    self._free[block.block_id] = block

    def cache(self, block: Block, block_hash: BlockHash) -> None:
        """Publish a full block under its hash (the first holder of a hash wins)."""
        if not self.enable_caching or block.block_hash is not None:
            return
        block.block_hash = block_hash
        if self._cached.setdefault(block_hash, block) is block and self.events is not None:
            self.events.stored(block_hash)

    def reset_prefix_cache(self) -> bool:
        if self.num_free != self.num_blocks:
            return False
        for block in self.blocks:
            block.block_hash = None
        if self.events is not None:
            for block_hash in self._cached:
                self.events.removed(block_hash)
        self._cached.clear()
        return True

    def cached_hashes(self) -> list[BlockHash]:
        """Every hash in the prefix cache now (callable from another thread)."""
        while True:
            try:
                return list(self._cached)
            except RuntimeError:  # resized by the engine thread mid-copy: try again
                continue
