"""The one definition of a KV block's hash, shared by engine, router and KV store.

A block's hash chains its parent's hash with the block's token ids and extra keys (LoRA name,
cache salt), so equal hashes mean equal prefixes. The chain's root is derived from a seed, which
every process of a deployment must share; the hash is stable across processes and machines
(sha256, never Python's randomized `hash`).
"""
from __future__ import annotations

import hashlib
import struct
from typing import Iterable, Sequence

BlockHash = int


def root_hash(seed: str = "tandem") -> BlockHash:
    return int.from_bytes(hashlib.sha256(b"tandem-kv-root:" + seed.encode()).digest()[:8], "little")


def chain_seed(seed: str, lora: str | None) -> str:
    """The seed of a request's chain: KV computed under a LoRA adapter is that adapter's alone."""
    return seed if lora is None else f"{seed}:lora:{lora}"


def hash_block(parent: BlockHash, tokens: Sequence[int], extra_keys: tuple = ()) -> BlockHash:
    h = hashlib.sha256(struct.pack("<Q", parent))
    h.update(struct.pack(f"<{len(tokens)}q", *tokens))
    if extra_keys:
        h.update(repr(extra_keys).encode())
    return int.from_bytes(h.digest()[:8], "little")


def hash_blocks(tokens: Sequence[int], block_size: int, seed: str = "tandem",
                extra_keys: tuple = (), parent: BlockHash | None = None) -> list[BlockHash]:
    """Chained hashes of every full block of `tokens` (a trailing partial block has none)."""
    out: list[BlockHash] = []
    h = root_hash(seed) if parent is None else parent
    for start in range(0, len(tokens) - block_size + 1, block_size):
        h = hash_block(h, tokens[start:start + block_size], extra_keys)
        out.append(h)
    return out


def extend_hashes(hashes: list[BlockHash], tokens: Sequence[int], block_size: int, seed: str,
                  extra_keys: tuple = ()) -> None:
    """Append the hashes of blocks of `tokens` that became full since `hashes` was computed."""
    done = len(hashes)
    parent = hashes[-1] if hashes else None
    hashes.extend(hash_blocks(tokens[done * block_size:], block_size, seed, extra_keys, parent))


def common_prefix_blocks(a: Iterable[BlockHash], b: set[BlockHash]) -> int:
    """How many leading hashes of `a` are in `b` (the cached prefix, in blocks)."""
    n = 0
    for h in a:
        if h not in b:
            break
        n += 1
    return n
