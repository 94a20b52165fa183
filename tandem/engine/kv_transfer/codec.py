"""KV chunks: a token range of one or more consecutive layers' K and V as bytes with a checksum
(XXH3-64), and back.

A chunk's data is [num_layers, 2, num_tokens, num_kv_heads, head_dim] (per layer K then V) in the
cache dtype, raw little-endian bytes. Chunks are cut so none exceeds `max_bytes`: messages stay
bounded whatever the prompt length.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import xxhash

from tandem.engine.kv_transfer import DEFAULT_CHUNK_BYTES  # noqa: F401 (the codec's bound)

warnings.filterwarnings("ignore", message="The given buffer is not writable")  # frombuffer on bytes


@dataclass
class KVChunkData:
    layer: int
    token_start: int
    num_tokens: int
    data: bytes | memoryview
    checksum: int = 0  # XXH3-64 of data
    num_layers: int = 1  # layers [layer, layer + num_layers)

    def seal(self) -> "KVChunkData":
        self.checksum = checksum(self.data)
        return self

    def intact(self) -> bool:
        return checksum(self.data) == self.checksum


def checksum(data) -> int:
    """XXH3-64: about 15 GB/s here against zlib's CRC-32 at 2 GB/s, which was the largest part of a
    transfer's time (computed once on each side of every chunk)."""
    return xxhash.xxh3_64_intdigest(data)


def hasher() -> "xxhash.xxh3_64":
    """`checksum` of bytes given in pieces (`update` each, then `intdigest`): a staged chunk's
    layers lie apart."""
    return xxhash.xxh3_64()


def slots_of(block_ids: list[int], block_size: int, start: int, end: int) -> torch.Tensor:
    """Flat cache slots of positions [start, end) of a sequence with this block table."""
    pos = torch.arange(start, end)
    table = torch.tensor(block_ids, dtype=torch.long)
    return table[pos // block_size] * block_size + pos % block_size


def encode(caches: list[torch.Tensor], slots: torch.Tensor) -> memoryview:
    """K and V of `slots` from consecutive layers' caches [2, blocks, block_size, Hkv, D], one layer
    after the other, as bytes (a view of one fresh host tensor: a single copy)."""
    _, num_blocks, block_size, heads, dim = caches[0].shape
    out = torch.empty((len(caches), 2, len(slots), heads, dim), dtype=caches[0].dtype)
    for i, cache in enumerate(caches):
        flat = cache.view(2, num_blocks * block_size, heads, dim)
        if flat.is_cuda:
            out[i].copy_(flat.index_select(1, slots.to(flat.device)))
        else:
            torch.index_select(flat, 1, slots, out=out[i])
    return memoryview(out.view(torch.uint8).numpy().reshape(-1))


def decode_into(cache: torch.Tensor, slots: torch.Tensor, data: bytes | memoryview) -> None:
    """Write one layer's bytes made by `encode` into `slots` of that layer's cache."""
    _, num_blocks, block_size, heads, dim = cache.shape
    kv = torch.frombuffer(data, dtype=torch.uint8).view(cache.dtype).view(2, len(slots), heads, dim)
    flat = cache.view(2, num_blocks * block_size, heads, dim)
    flat.index_copy_(1, slots.to(cache.device), kv.to(cache.device))


class LocalCaches:
    """The KV cache this process holds whole (every KV head), read and written as the wire carries it.
    A parallel group's is group_caches.GroupCaches: the same two methods over every rank's layers and heads."""

    def __init__(self, caches: list[torch.Tensor]) -> None:
        self.caches = caches
        self.num_layers = len(caches)
        self.num_kv_heads = caches[0].shape[3]

    def encode(self, layers: range, slots: torch.Tensor) -> memoryview:
        return encode(self.caches[layers.start:layers.stop], slots)

    def decode_into(self, layer: int, slots: torch.Tensor, data: bytes | memoryview) -> None:
        decode_into(self.caches[layer], slots, data)


def split(start: int, end: int, token_bytes: int, max_bytes: int) -> list[tuple[int, int]]:
    """Token ranges [a, b) covering [start, end), each of at most max_bytes (one token at least)."""
    step = max(1, max_bytes // token_bytes)
    return [(a, min(a + step, end)) for a in range(start, end, step)]
