"""The Llama family in native torch: Llama 2/3.x, Mistral, Qwen2/2.5 (q/k/v bias), Qwen3 (q/k norm),
SmolLM2. Tokens of all requests are one flat batch; attention goes through `AttentionBatch`.
Parallelism stays out of this file."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tandem.engine.attention import AttentionBatch
from tandem.engine import ops
from tandem.engine.models.rope import rope_cos_sin, rope_parameters

_ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """norm(x); with a residual, (norm(x + residual), x + residual) in one pass."""
        out, total = ops.rms_norm(x, self.weight, self.eps, residual)
        return out if residual is None else (out, total)


class Linear(nn.Linear):
    """nn.Linear through ops.linear. On CPUs in half precision `pack()` swaps the weight for oneDNN's
    blocked copy (ops.pack_weight): the plain weight is dropped, not kept twice."""

    packed: torch.Tensor | None = None
    lora: tuple | None = None  # (LoRALayers, this projection's adapters' parts): lora.py

    def pack(self) -> None:
        self.packed = ops.pack_weight(self.weight)
        if self.packed is not None:
            self.weight = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = ops.linear(x, self.weight, self.bias, self.packed)
        if self.lora is not None and self.lora[0].batch.groups:
            y = self.lora[0].apply(self.lora[1], x, y)
        return y


class DecoderLayer(nn.Module):
    def __init__(self, cfg: "ModelShape", layer: int) -> None:
        super().__init__()
        self.layer, self.cfg = layer, cfg
        self.input_layernorm = RMSNorm(cfg.hidden, cfg.eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden, cfg.eps)
        q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.qkv_proj = Linear(cfg.hidden, q + 2 * kv, bias=cfg.qkv_bias)
        self.o_proj = Linear(q, cfg.hidden, bias=False)
        self.gate_up_proj = Linear(cfg.hidden, 2 * cfg.intermediate, bias=False)
        self.down_proj = Linear(cfg.intermediate, cfg.hidden, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.eps)
        self.act = _ACTIVATIONS[cfg.act]

    def forward(self, h: torch.Tensor, residual: torch.Tensor | None, positions: torch.Tensor,
                rope: tuple[torch.Tensor, torch.Tensor], attn: AttentionBatch,
                keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """h: the previous layer's output, not yet added to the residual stream (vLLM's layout: the
        add fuses into this layer's first norm). Returns (this layer's output, the residual); with
        `keep`, only those rows' (every row's K/V is still written)."""
        c = self.cfg
        if residual is None:
            x, residual = self.input_layernorm(h), h
        else:
            x, residual = self.input_layernorm(h, residual)
        q, k, v = self.qkv_proj(x).split(
            [c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.num_kv_heads * c.head_dim], dim=-1)
        q = q.view(-1, c.num_heads, c.head_dim)
        k = k.view(-1, c.num_kv_heads, c.head_dim)
        v = v.view(-1, c.num_kv_heads, c.head_dim)
        if c.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        o = attn.forward(self.layer, q, k, v, (positions, *rope))
        if keep is not None:  # rows past attention are independent: the rest need no projection or MLP
            if not keep.numel():
                return residual[:0], residual[:0]
            o, residual = o[keep], residual[keep]
        o = self.o_proj(o.reshape(-1, c.num_heads * c.head_dim))
        x, residual = self.post_attention_layernorm(o, residual)
        if c.act == "silu":
            return self.down_proj(ops.silu_and_mul(self.gate_up_proj(x))), residual
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(self.act(gate) * up), residual


class ModelShape:
    """The numbers a config.json fixes, under one spelling for every family."""

    def __init__(self, config: dict, max_model_len: int) -> None:
        self.hidden = config["hidden_size"]
        self.num_layers = config["num_hidden_layers"]
        self.num_heads = config["num_attention_heads"]
        self.num_kv_heads = config.get("num_key_value_heads") or self.num_heads
        self.head_dim = config.get("head_dim") or self.hidden // self.num_heads
        self.intermediate = config["intermediate_size"]
        self.vocab = config["vocab_size"]
        self.eps = config.get("rms_norm_eps", 1e-6)
        self.act = config.get("hidden_act", "silu")
        self.tie = config.get("tie_word_embeddings", False)
        arch = (config.get("architectures") or [""])[0]
        self.qkv_bias = config.get("attention_bias", arch == "Qwen2ForCausalLM")
        self.qk_norm = arch == "Qwen3ForCausalLM"
        self.theta, self.rope_scaling = rope_parameters(config)
        window = config.get("sliding_window")
        uses_window = config.get("use_sliding_window", arch == "MistralForCausalLM")
        self.sliding_window = window if (window and uses_window) else None
        self.max_positions = max_model_len
        if self.act not in _ACTIVATIONS:
            raise ValueError(f"unsupported hidden_act {self.act!r}; supported: {', '.join(_ACTIVATIONS)}")


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: dict, max_model_len: int) -> None:
        super().__init__()
        self.shape = cfg = ModelShape(config, max_model_len)
        # an explicit weight skips nn.Embedding's random init, which under the loader's meta-device
        # context imports torch._dynamo (~2-3 s of every worker's start on a CPU)
        self.embed_tokens = nn.Embedding(cfg.vocab, cfg.hidden, _weight=torch.empty(cfg.vocab, cfg.hidden))
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden, cfg.eps)
        self.lm_head = None if cfg.tie else Linear(cfg.hidden, cfg.vocab, bias=False)
        self.tied_head_packed: torch.Tensor | None = None  # pack_weights' copy of the tied embedding
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)

    def init_rope(self) -> None:
        """Compute the rotary tables (buffers, not weights) on the model's device."""
        s = self.shape
        cos, sin = rope_cos_sin(s.head_dim, s.max_positions, s.theta, s.rope_scaling)
        device = self.embed_tokens.weight.device
        self.rope_cos, self.rope_sin = cos.to(device), sin.to(device)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionBatch,
                keep: torch.Tensor | None = None) -> torch.Tensor:
        """The final hidden states of every row, or with `keep` (row indices) of those rows only, in
        that order: a prompt's rows that sample nothing skip the last layer's projection and MLP
        (about 1/num_layers of a prompt step's FLOPs)."""
        h, residual = self.forward_layers(self.embed_tokens(input_ids), None, positions, attn, keep,
                                          range(len(self.layers)))
        return self.finish(h, residual)

    def forward_layers(self, h: torch.Tensor, residual: torch.Tensor | None, positions: torch.Tensor,
                       attn: AttentionBatch, keep: torch.Tensor | None, layers: range):
        """Layers `layers` of the stack (a pipeline stage runs its own): (output, residual) in, and out."""
        last = len(self.layers) - 1
        for i in layers:
            h, residual = self.layers[i](h, residual, positions, (self.rope_cos, self.rope_sin), attn,
                                         keep if i == last else None)
        return h, residual

    def finish(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """The final norm over the last layer's output and residual: the hidden states logits read."""
        return self.norm(h, residual)[0] if h.shape[0] else h

    def pack_weights(self) -> None:
        """CPUs, half precision: every projection in oneDNN's blocked layout (Linear.pack). A tied
        embedding stays for the lookup, so the head gets its own packed copy. Call it last: the
        plain weights are gone after (the KV layout's fingerprint samples them first)."""
        for module in self.modules():
            if isinstance(module, Linear):
                module.pack()
        if self.lm_head is None:
            self.tied_head_packed = ops.pack_weight(self.embed_tokens.weight)

    def compute_logits(self, hidden: torch.Tensor, upcast: bool = True) -> torch.Tensor:
        """Logits in float32, or in the model's dtype (upcast=False: a reader that widens as it goes)."""
        if self.lm_head is not None:
            logits = self.lm_head(hidden)
        else:
            logits = ops.linear(hidden, self.embed_tokens.weight, packed=self.tied_head_packed)
        return logits.float() if upcast else logits

    @torch.no_grad()
    def load_weights(self, weights) -> None:
        """Hugging Face tensor names -> this module's (fused q/k/v and gate/up) parameters."""
        cfg = self.shape
        q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        qkv_offsets = {"q_proj": (0, q), "k_proj": (q, q + kv), "v_proj": (q + kv, q + 2 * kv)}
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            name = name.removeprefix("model.")
            if "rotary_emb" in name:
                continue
            if name == "lm_head.weight" and cfg.tie:
                continue
            parts = name.split(".")
            target, rows = name, None
            if len(parts) >= 4 and parts[2] == "self_attn" and parts[3] in qkv_offsets:
                target = ".".join(parts[:2] + ["qkv_proj", parts[4]])
                rows = qkv_offsets[parts[3]]
            elif len(parts) >= 4 and parts[2] == "self_attn":
                target = ".".join(parts[:2] + parts[3:])
            elif len(parts) >= 4 and parts[2] == "mlp" and parts[3] in ("gate_proj", "up_proj"):
                target = ".".join(parts[:2] + ["gate_up_proj", parts[4]])
                rows = (0, cfg.intermediate) if parts[3] == "gate_proj" else (cfg.intermediate, 2 * cfg.intermediate)
            elif len(parts) >= 4 and parts[2] == "mlp":
                target = ".".join(parts[:2] + parts[3:])
            if target not in params:
                raise ValueError(f"unexpected weight {name!r} for this architecture")
            param = params[target]
            if rows is None:
                param.copy_(tensor)
            else:
                param[rows[0]:rows[1]].copy_(tensor)
            loaded.add(f"{target}:{rows}")
        expected = len(params) + sum(1 for n in params if "qkv_proj" in n) * 2 + \
            sum(1 for n in params if "gate_up_proj" in n)
        if len(loaded) != expected:
            raise ValueError(f"checkpoint is missing weights: loaded {len(loaded)} of {expected} tensors")
