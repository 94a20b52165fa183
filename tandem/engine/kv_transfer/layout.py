"""A worker's KV layout descriptor and the compatibility hash peers compare before a transfer.

Two workers can exchange KV only if every field that shapes the bytes matches: the model (its
fingerprint), layers, KV heads, head size, dtype, block size, memory layout and tensor-parallel
size. The hash covers exactly those; `mismatches` names the fields that differ.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

import torch

LAYOUT = "layer[kv,block,slot,head,dim]"  # one tensor per layer: [2, num_blocks, block_size, Hkv, D]
_COMPAT_FIELDS = ("model_fingerprint", "architecture", "num_layers", "num_kv_heads", "head_dim", "dtype",
                  "block_size", "layout", "tp_size")


@dataclass(frozen=True)
class LayoutDescriptor:
    model_fingerprint: str
    architecture: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    block_size: int
    layout: str = LAYOUT
    tp_rank: int = 0
    tp_size: int = 1
    compat_hash: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if not self.compat_hash:
            key = json.dumps({f: getattr(self, f) for f in _COMPAT_FIELDS}, sort_keys=True)
            object.__setattr__(self, "compat_hash", hashlib.sha256(key.encode()).hexdigest()[:16])

    @property
    def token_bytes(self) -> int:
        """Bytes of one token's K and V in one layer."""
        return 2 * self.num_kv_heads * self.head_dim * self.torch_dtype.itemsize

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def to_dict(self) -> dict:
        return asdict(self)


def mismatches(ours: LayoutDescriptor, theirs: LayoutDescriptor) -> list[str]:
    """'field ours != theirs' for every compatibility field that differs (empty: compatible)."""
    return [f"{f} {getattr(ours, f)!r} != {getattr(theirs, f)!r}" for f in _COMPAT_FIELDS
            if getattr(ours, f) != getattr(theirs, f)]


def incompatibility(ours: LayoutDescriptor, theirs: LayoutDescriptor, who: str = "peer") -> str | None:
    """A message naming every mismatch (ours first), or None when the layouts are compatible."""
    diff = mismatches(ours, theirs)
    if not diff and ours.compat_hash == theirs.compat_hash:
        return None
    detail = "; ".join(diff) or f"compat_hash {ours.compat_hash} != {theirs.compat_hash}"
    return f"incompatible KV layout (this worker vs {who}): {detail}"


def model_fingerprint(hf_config: dict, model: torch.nn.Module) -> str:
    """The config that shapes the model plus a sample of its weights: equal fingerprints mean the
    same model, so KV computed by one is valid for the other. The sample is each of the first four
    weights' first row, which rank 0 of a tensor-parallel group holds whole too (its first heads)."""
    h = hashlib.sha256(json.dumps({k: v for k, v in sorted(hf_config.items())
                                   if not k.startswith("_") and k not in ("transformers_version", "torch_dtype",
                                                                          "dtype")},
                                  sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, param in list(model.named_parameters())[:4]:
            sample = param.detach().reshape(-1, param.shape[-1])[0, :4096].float().cpu()
            h.update(name.encode())
            h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


def describe(hf_config: dict, model: torch.nn.Module, dtype: torch.dtype, block_size: int) -> LayoutDescriptor:
    """The layout KV travels in: every KV head of the model, whether one process holds them or a
    parallel group does (its rank 0 gathers and scatters them: group_caches.GroupCaches), so prefill
    and decode pair across different tensor-parallel sizes. tp_rank and tp_size stay 0 and 1 until
    ranks transfer their own heads."""
    s = model.shape
    return LayoutDescriptor(
        model_fingerprint=model_fingerprint(hf_config, model),
        architecture=(hf_config.get("architectures") or ["?"])[0], num_layers=s.num_layers,
        num_kv_heads=hf_config.get("num_key_value_heads") or hf_config["num_attention_heads"],
        head_dim=s.head_dim, dtype=str(dtype).removeprefix("torch."), block_size=block_size)
