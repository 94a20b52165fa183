"""bf16 on CPUs against transformers' bf16 on the embedded SmolLM2, a real model. Teacher-forced:
transformers reads each of our greedy sequences in one forward pass, and its argmax must be our token
at least as often as transformers' bf16 argmax is its own float32 argmax (less one token in 100).
(A free-running comparison measures chaos instead: one near-tie changes the rest of a sequence.)
This covers what float32's token-identity tests cannot: the packed bf16 GEMMs, the C++ attention
kernel and the rounding points of the bf16 twins.

Measured on a Sapphire Rapids CPU: ours vs transformers bf16 0.979; transformers bf16 vs its float32
0.971; transformers bf16 SDPA vs its eager attention 0.979. bf16 noise alone flips about 2% of this
small model's argmaxes."""
from __future__ import annotations

import torch

from tandem import SamplingParams

CHATS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers and explain why each is prime.",
    "Give me a recipe for pancakes.",
    "Why do cats purr?",
    "Translate 'good morning' into Spanish and German.",
]
NEW_TOKENS = 48


@torch.no_grad()
def test_bf16_greedy_agrees_with_transformers_bf16(make_llm, smollm_dir):
    from transformers import AutoModelForCausalLM

    llm = make_llm(smollm_dir, dtype="bfloat16", max_model_len=512)
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS)
    outs = llm.chat([[{"role": "user", "content": c}] for c in CHATS], params, use_tqdm=False)
    hf16 = AutoModelForCausalLM.from_pretrained(smollm_dir, dtype=torch.bfloat16).eval()
    hf32 = AutoModelForCausalLM.from_pretrained(smollm_dir, dtype=torch.float32).eval()
    ours = floor = total = 0
    for out in outs:
        prompt, generated = list(out.prompt_token_ids), list(out.outputs[0].token_ids)
        ids, where = torch.tensor([prompt + generated]), slice(len(prompt) - 1, -1)
        best16 = hf16(ids).logits[0, where].argmax(-1)
        ours += int((best16 == torch.tensor(generated)).sum())
        floor += int((best16 == hf32(ids).logits[0, where].argmax(-1)).sum())
        total += len(generated)
    assert total >= 4 * len(CHATS), "the chats should not end at once"
    assert ours / total >= floor / total - 0.01, \
        f"{ours} of {total} tokens are transformers' bf16 argmax (its bf16 vs its float32: {floor})"
