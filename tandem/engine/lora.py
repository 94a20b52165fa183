"""LoRA adapters (PEFT folders), many in one batch, on the torch path.

An adapter's lifecycle: named at start (`EngineConfig.lora_modules`: name -> folder) -> loaded onto the
model's device (`load_adapter`: A and B per target projection, the scale folded into B) -> a request names
it (`SamplingParams.lora`) -> each step the runner tells the model which rows run under which adapter
(`LoRABatch`), and every adapted projection adds `x A^T B^T` to those rows of its output.

The model's fused projections take their parts' adapters in slices of their output: q/k/v in qkv_proj,
gate/up in gate_up_proj. A request's KV blocks hash under its adapter's key, its name and a digest of its
files (kv_cache/manager.py), so prefixes are shared only within one adapter, and an adapter retrained
under the same name never meets its old KV in a KV store. Rows under an adapter skip the decode CUDA graphs, lookaheads and the
last layer's row pruning: they run as ordinary eager steps.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from typing import Callable

import torch
from safetensors.torch import load_file

# PEFT's module names -> our projection that holds them (its output slice: _geometry)
_TARGETS = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj", "o_proj": "o_proj",
            "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj", "down_proj": "down_proj"}
_KEY = re.compile(r"(?:.*\.)?layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")


@dataclass(frozen=True)
class LoRARequest:
    """vLLM's offline handle of an adapter: `LLM.generate(..., lora_request=LoRARequest("sql", 1, "/path"))`
    (the engine loads it on first use; the name is what requests then run under)."""
    lora_name: str
    lora_int_id: int
    lora_path: str


@dataclass
class LoRABatch:
    """Which rows of this step's batch run under which adapter: (adapter index, row indices)."""
    groups: list[tuple[int, torch.Tensor]] = field(default_factory=list)


@dataclass
class Adapter:
    name: str
    path: str
    rank: int
    key: str  # what its KV hashes chain on: the name and a digest of its files (retrained weights: new KV)
    # (layer, projection) -> [(output start, output end, A [r, in], B [end - start, r] * scale)]
    weights: dict[tuple[int, str], list[tuple[int, int, torch.Tensor, torch.Tensor]]]


def _geometry(shape, module: str) -> tuple[int, int, int]:
    """(input width, output start, output end) of a PEFT module inside our projection's output."""
    q, kv, inter, hidden = shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim, shape.intermediate, shape.hidden
    return {"q_proj": (hidden, 0, q), "k_proj": (hidden, q, q + kv), "v_proj": (hidden, q + kv, q + 2 * kv),
            "o_proj": (q, 0, hidden), "gate_proj": (hidden, 0, inter), "up_proj": (hidden, inter, 2 * inter),
            "down_proj": (inter, 0, hidden)}[module]


def load_adapter(name: str, path: str, shape, dtype: torch.dtype, device: torch.device, max_rank: int,
                 shard: Callable[[dict], dict] | None = None) -> Adapter:
    """A PEFT LoRA folder (adapter_config.json, adapter_model.safetensors) for this model; ValueError naming
    the adapter for anything it cannot serve exactly. `shard`: a tensor-parallel rank's cut of the tensors
    (sharding.shard_lora), `shape` being that rank's."""
    def bad(why: str) -> ValueError:
        return ValueError(f"LoRA adapter {name!r} ({path}): {why}")

    try:
        digest = hashlib.sha256()
        for file in ("adapter_config.json", "adapter_model.safetensors"):
            with open(os.path.join(path, file), "rb") as f:
                digest.update(f.read())
        with open(os.path.join(path, "adapter_config.json"), encoding="utf-8") as f:
            config = json.load(f)
        tensors = load_file(os.path.join(path, "adapter_model.safetensors"))
        tensors = shard(tensors) if shard else tensors
    except Exception as exc:  # noqa: BLE001 - missing files, bad JSON, safetensors' own errors
        raise bad(f"not a PEFT LoRA folder: {exc}") from exc
    if not isinstance(config, dict) or config.get("peft_type", "LORA") != "LORA":
        raise bad("adapter_config.json is not a LoRA config (peft_type LORA)")
    for key, off in (("bias", "none"), ("use_dora", False), ("modules_to_save", None), ("alpha_pattern", None),
                     ("rank_pattern", None)):
        if config.get(key, off) not in (off, [], {}, False):
            raise bad(f"{key}={config[key]!r} is not supported")
    rank = config.get("r")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise bad(f"r must be an integer >= 1, got {rank!r}")
    if rank > max_rank:
        raise bad(f"rank {rank} is over max_lora_rank {max_rank}")
    alpha = float(config.get("lora_alpha", rank))
    scale = alpha / (rank ** 0.5 if config.get("use_rslora") else rank)
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        m = _KEY.match(key)
        if m is None or m.group(2) not in _TARGETS:
            raise bad(f"weight {key!r} targets a module this engine does not adapt ({', '.join(_TARGETS)})")
        layer = int(m.group(1))
        if layer >= shape.num_layers:
            raise bad(f"weight {key!r} is for layer {layer}; the model has {shape.num_layers}")
        pairs.setdefault((layer, m.group(2)), {})[m.group(3)] = tensor
    weights: dict[tuple[int, str], list] = {}
    for (layer, module), ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise bad(f"layer {layer} {module} has lora_{'A' if 'A' not in ab else 'B'} missing")
        width, start, end = _geometry(shape, module)
        a, b = ab["A"], ab["B"]
        if tuple(a.shape) != (rank, width) or tuple(b.shape) != (end - start, rank):
            raise bad(f"layer {layer} {module}: A {tuple(a.shape)} and B {tuple(b.shape)} are not ({rank}, {width}) "
                      f"and ({end - start}, {rank}): an adapter of rank {rank} for another model?")
        weights.setdefault((layer, _TARGETS[module]), []).append(
            (start, end, a.to(device, dtype), (b.float() * scale).to(device, dtype)))
    return Adapter(name, path, rank, f"{name}@{digest.hexdigest()[:16]}", weights)


class LoRALayers:
    """The adapters of one model, and the batch the runner set for the step in flight."""

    def __init__(self, model: torch.nn.Module, adapters: list[Adapter]) -> None:
        self.adapters = adapters
        self.index = {a.name: i for i, a in enumerate(adapters)}
        self.keys = {a.name: a.key for a in adapters}
        self.batch = LoRABatch()
        for i, layer in enumerate(model.layers):
            if not hasattr(layer, "qkv_proj"):
                continue  # another pipeline stage's layer
            for projection in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"):
                linear = getattr(layer, projection)
                parts = {a_i: a.weights[(i, projection)] for a_i, a in enumerate(adapters) if (i, projection) in a.weights}
                linear.lora = (self, parts) if parts else None

    def apply(self, parts: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y plus each adapted row's x A^T B^T, in its output part."""
        for adapter, rows in self.batch.groups:
            for start, end, a, b in parts.get(adapter, ()):
                y[rows, start:end] += (x[rows] @ a.T) @ b.T
        return y
