"""Rotary position embedding tables (default, linear, llama3 scaling), Hugging Face's half-rotation."""
from __future__ import annotations

import math

import torch


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    factor = scaling["factor"]
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old_len = scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rope_parameters(config: dict) -> tuple[float, dict | None]:
    """(theta, scaling) from a config.json in either transformers 4 or 5 spelling."""
    params = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or params or None
    theta = config.get("rope_theta", params.get("rope_theta", 10000.0))
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind == "default":
            scaling = None
        elif kind not in ("linear", "llama3"):
            raise ValueError(f"unsupported rope scaling {kind!r}; supported: default, linear, llama3")
    return float(theta), scaling


def rope_cos_sin(head_dim: int, max_positions: int, theta: float, scaling: dict | None,
                 partial: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [max_positions, rot_dim] in float32."""
    rot_dim = int(head_dim * partial)
    inv_freq = 1.0 / (theta ** (torch.arange(0, rot_dim, 2, dtype=torch.int64).float() / rot_dim))
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind == "llama3":
            inv_freq = _llama3_inv_freq(inv_freq, scaling)
        elif kind == "linear":
            inv_freq = inv_freq / scaling["factor"]
    t = torch.arange(max_positions, dtype=torch.int64).float()
    freqs = torch.outer(t, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()
