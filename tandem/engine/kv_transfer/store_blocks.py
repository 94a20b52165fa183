"""Whole KV blocks as bytes, for the prefix KV store (services/kvstore): what a prefill worker puts
there after computing a prompt, and loads from there before computing one.

A payload is one block of every layer, [num_layers, 2, block_size, Hkv, D] in the cache dtype (the
codec's chunk layout over the block's slots), so it is valid only under the writer's layout: the
store files it under that layout's compatibility hash.
"""
from __future__ import annotations

import torch

from tandem.engine.kv_transfer import codec
from tandem.engine.kv_transfer.layout import LayoutDescriptor


def payload_bytes(layout: LayoutDescriptor) -> int:
    return layout.num_layers * layout.block_size * layout.token_bytes


def _slots(block_id: int, block_size: int) -> torch.Tensor:
    return torch.arange(block_id * block_size, (block_id + 1) * block_size)


def read_block(caches: list[torch.Tensor], block_id: int, block_size: int) -> bytes:
    """The block's K and V across every layer (a host copy)."""
    return bytes(codec.encode(caches, _slots(block_id, block_size)))


def write_block(caches: list[torch.Tensor], block_id: int, block_size: int, payload: bytes) -> None:
    """`read_block`'s bytes into block `block_id` of every layer."""
    per_layer = len(payload) // len(caches)
    slots = _slots(block_id, block_size)
    view = memoryview(payload)
    for i, cache in enumerate(caches):
        codec.decode_into(cache, slots, view[i * per_layer:(i + 1) * per_layer])
