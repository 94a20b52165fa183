"""Tensor parallelism's arithmetic, kept out of the model file: what a rank's share of a Llama-family model
is, which slice of each checkpoint tensor it loads, and where its partial sums meet.

Megatron's split: q/k/v and gate/up are split by output (each rank owns whole attention heads and a
slice of the MLP), o_proj and down_proj by input, so each rank's output of those two is a partial sum
that one all-reduce completes. Everything else (embedding, norms, the LM head) is whole on every rank.
With fewer KV heads than ranks, each KV head is replicated on the ranks whose query heads read it (as
vLLM does), which needs the rank count to be a multiple of the KV-head count.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch
from torch import nn


@dataclass(frozen=True)
class Shard:
    rank: int
    size: int

    def span(self, total: int) -> tuple[int, int]:
        """This rank's contiguous share of `total` equal parts (heads, MLP columns)."""
        per = total // self.size
        return self.rank * per, (self.rank + 1) * per

    def kv_span(self, num_kv_heads: int) -> tuple[int, int]:
        if num_kv_heads >= self.size:
            return self.span(num_kv_heads)
        head = self.rank * num_kv_heads // self.size  # replicated: the KV head this rank's queries read
        return head, head + 1


def _heads(config: dict) -> tuple[int, int, int]:
    """(attention heads, KV heads, head size) of a config.json."""
    heads = config["num_attention_heads"]
    return heads, config.get("num_key_value_heads") or heads, config.get("head_dim") or config["hidden_size"] // heads


def shard_problem(config: dict, size: int) -> str | None:
    """Why `config`'s model cannot be split `size` ways, or None."""
    heads, kv, _ = _heads(config)
    inter = config["intermediate_size"]
    if size < 1:
        return f"tensor_parallel_size must be >= 1, got {size}"
    if heads % size:
        return f"the model's {heads} attention heads do not split evenly over tensor_parallel_size={size}"
    if (kv % size) if kv >= size else (size % kv):
        return (f"the model's {kv} KV heads neither split evenly over tensor_parallel_size={size} "
                "nor replicate evenly onto it")
    if inter % size:
        return f"the model's intermediate_size {inter} does not split evenly over tensor_parallel_size={size}"
    return None


def shard_config(config: dict, shard: Shard) -> dict:
    """config.json as one rank's model sees it: its heads, KV heads and MLP width (head_dim explicit,
    since hidden_size / heads no longer gives it)."""
    problem = shard_problem(config, shard.size)
    if problem:
        raise ValueError(problem)
    heads, kv, head_dim = _heads(config)
    lo, hi = shard.kv_span(kv)
    return {**config, "num_attention_heads": heads // shard.size, "num_key_value_heads": hi - lo,
            "head_dim": head_dim, "intermediate_size": config["intermediate_size"] // shard.size}


def _cuts(config: dict, shard: Shard) -> dict[str, tuple[int, tuple[int, int]]]:
    """Projection name -> (the weight's dim this rank cuts, its span on it): output dim 0 for q/k/v and gate/up,
    input dim 1 for o and down."""
    heads, kv, head_dim = _heads(config)
    q_rows = tuple(h * head_dim for h in shard.span(heads))
    kv_rows = tuple(h * head_dim for h in shard.kv_span(kv))
    mlp = shard.span(config["intermediate_size"])
    return {"q_proj": (0, q_rows), "k_proj": (0, kv_rows), "v_proj": (0, kv_rows), "o_proj": (1, q_rows),
            "gate_proj": (0, mlp), "up_proj": (0, mlp), "down_proj": (1, mlp)}


def _cut(tensor: torch.Tensor, dim: int, span: tuple[int, int]) -> torch.Tensor:
    return tensor.narrow(dim, span[0], span[1] - span[0])


def shard_weights(weights: Iterable[tuple[str, torch.Tensor]], config: dict,
                  shard: Shard) -> Iterator[tuple[str, torch.Tensor]]:
    """Hugging Face (name, tensor) pairs, each cut to this rank's slice (whole where it is replicated)."""
    cuts = _cuts(config, shard)
    for name, tensor in weights:
        parts = name.split(".")
        cut = cuts.get(parts[-2]) if len(parts) >= 2 else None
        # weights and biases of output-split projections alike; an input-split one's bias (none in this family)
        # would be whole
        if cut is not None and tensor.dim() > cut[0]:
            tensor = _cut(tensor, *cut)
        yield name, tensor


def shard_lora(tensors: dict[str, torch.Tensor], config: dict, shard: Shard) -> dict[str, torch.Tensor]:
    """A PEFT adapter's tensors as this rank applies them: B cut like its projection's output (q/k/v, gate/up),
    A like its input (o, down), so the adapter's share of an input-split projection joins that projection's
    partial sum before the all-reduce."""
    cuts = _cuts(config, shard)
    out = {}
    for name, tensor in tensors.items():
        parts = name.split(".")
        cut = cuts.get(parts[-3]) if len(parts) >= 3 else None
        if cut is not None and parts[-2] == ("lora_B" if cut[0] == 0 else "lora_A"):
            tensor = _cut(tensor, *cut).contiguous()
        out[name] = tensor
    return out


def reduce_partial_sums(model: nn.Module, all_reduce: Callable[[torch.Tensor], None]) -> None:
    """After every o_proj and down_proj, sum the ranks' partial outputs in place (a forward hook, so the
    model's own code does not change)."""
    def hook(_module, _inputs, output):
        all_reduce(output)

    for name, module in model.named_modules():
        if name.endswith(("o_proj", "down_proj")):
            module.register_forward_hook(hook)
