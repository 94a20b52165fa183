"""Whole KV blocks as bytes, for the prefix KV store (services/kvstore): what a prefill worker puts
there after computing a prompt, and loads from there before computing one.

A payload is one block of every layer, [num_layers, 2, block_size, Hkv, D] in the cache dtype, so it
is valid only under the writer's layout: the store files it under that layout's compatibility hash.
Blocks move together, one gather (or scatter) and one device copy per layer whatever their number:
on a GPU each copy to or from host memory waits for the device.
"""
from __future__ import annotations

import torch

from tandem.engine.kv_transfer import codec
from tandem.engine.kv_transfer.layout import LayoutDescriptor


def payload_bytes(layout: LayoutDescriptor) -> int:
    return layout.num_layers * layout.block_size * layout.token_bytes


def _slots(block_ids: list[int], block_size: int) -> torch.Tensor:
    """Every slot of these blocks, block after block."""
    base = torch.tensor(block_ids, dtype=torch.long)[:, None] * block_size
    return (base + torch.arange(block_size)).reshape(-1)


def read_blocks(caches: "codec.LocalCaches", block_ids: list[int], block_size: int) -> list[bytes]:
    """Each block's K and V across every layer, as one payload per block (host copies)."""
    if not block_ids:
        return []
    flat = torch.frombuffer(caches.encode(range(caches.num_layers), _slots(block_ids, block_size)), dtype=torch.uint8)
    per_block = flat.view(caches.num_layers, 2, len(block_ids), -1).permute(2, 0, 1, 3)
    return [per_block[i].contiguous().numpy().tobytes() for i in range(len(block_ids))]


def write_blocks(caches: "codec.LocalCaches", block_ids: list[int], block_size: int, payloads: list[bytes]) -> None:
    """`read_blocks`' payloads into these blocks of every layer."""
    if not block_ids:
        return
    stacked = torch.stack([torch.frombuffer(p, dtype=torch.uint8) for p in payloads])
    by_layer = stacked.view(len(block_ids), caches.num_layers, 2, -1).permute(1, 2, 0, 3)
    slots = _slots(block_ids, block_size)
    for i in range(caches.num_layers):
        caches.decode_into(i, slots, memoryview(by_layer[i].contiguous().numpy().reshape(-1)))
