"""Random-weight Llama configs of public shapes for GPU benchmarks and checks, saved as config-only
Hugging Face folders (Tandem's load_format="dummy" and transformers' from_config read them)."""
from __future__ import annotations

import json
import os
import tempfile

LLAMA3_ROPE = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}

SHAPES = {
    # Llama-3.2-1B
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, head_dim=64, tie_word_embeddings=True,
               rope_scaling={**LLAMA3_ROPE, "factor": 32.0}),
    # Llama-3.1-8B
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, head_dim=128, tie_word_embeddings=False,
               rope_scaling={**LLAMA3_ROPE, "factor": 8.0}),
    # small enough to compare token for token with transformers in float32
    "tiny": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=2, head_dim=64, tie_word_embeddings=False,
                 rope_scaling={**LLAMA3_ROPE, "factor": 8.0}),
}


def llama_config(shape: str, vocab_size: int = 128256, max_position_embeddings: int = 8192) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab_size,
            "max_position_embeddings": max_position_embeddings, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
            "hidden_act": "silu", "bos_token_id": 128000, "eos_token_id": 128001, "torch_dtype": "bfloat16",
            "initializer_range": 0.02, **SHAPES[shape]}


def config_folder(shape: str, **overrides) -> str:
    folder = tempfile.mkdtemp(prefix=f"tandem-{shape}-")
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({**llama_config(shape), **overrides}, f)
    return folder


def num_params(cfg: dict) -> int:
    h, i, n, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    d = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    attn = h * d * (cfg["num_attention_heads"] * 2 + cfg["num_key_value_heads"] * 2)
    per_layer = attn + 3 * h * i + 2 * h
    return n * per_layer + v * h * (1 if cfg["tie_word_embeddings"] else 2) + h


def kv_bytes_per_token(cfg: dict, itemsize: int = 2) -> int:
    d = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    return 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * d * itemsize
