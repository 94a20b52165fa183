"""Model registry: Hugging Face architecture name -> native torch implementation."""
from __future__ import annotations

from tandem.engine.models.llama import LlamaForCausalLM

MODEL_REGISTRY = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": LlamaForCausalLM,
}


def model_class(config: dict) -> type[LlamaForCausalLM]:
    """The implementation for a config.json; an unsupported architecture is a clear error."""
    archs = config.get("architectures") or []
    for arch in archs:
        if arch in MODEL_REGISTRY:
            return MODEL_REGISTRY[arch]
    raise ValueError(
        f"unsupported model architecture {archs or config.get('model_type')!r}; "
        f"Tandem supports: {', '.join(sorted(MODEL_REGISTRY))}")
