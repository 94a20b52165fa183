"""CPU half-precision projections run from oneDNN's blocked copy of each weight (ops.pack_weight), made
once at start-up instead of on every call: the same results as F.linear, the plain weights dropped, and
float32 (which must match Hugging Face's MKL sums) left alone."""
from __future__ import annotations

import pytest
import torch

from tandem import SamplingParams
from tandem.engine import ops
from tandem.engine.models.llama import Linear

# pack_weight declines where oneDNN cannot run bf16 (a torch build without it, a CPU without AVX-512);
# the engine then keeps F.linear, which the other tests cover
needs_onednn = pytest.mark.skipif(ops.pack_weight(torch.zeros(2, 2, dtype=torch.bfloat16)) is None,
                                  reason="oneDNN has no bf16 GEMM on this CPU or torch build")


@needs_onednn
@pytest.mark.parametrize("rows", [1, 7, 64, 300])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_gives_f_linear(rows, bias):
    gen = torch.Generator().manual_seed(rows)
    weight = (torch.randn(200, 96, generator=gen) * 0.1).bfloat16()
    b = torch.randn(200, generator=gen).bfloat16() if bias else None
    x = torch.randn(rows, 96, generator=gen).bfloat16()
    packed = ops.pack_weight(weight)
    got = ops.linear(x, None, b, packed)
    want = torch.nn.functional.linear(x, weight, b)
    assert got.shape == want.shape and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), rtol=1.6e-2, atol=1e-2)
    # leading dims pass through, as with F.linear
    assert ops.linear(x.view(1, rows, 96), None, b, packed).shape == (1, rows, 200)


def test_float32_keeps_the_plain_weight():
    layer = Linear(96, 200)
    layer.pack()
    assert layer.packed is None and layer.weight is not None  # float32: F.linear, as Hugging Face
    x = torch.randn(3, 96)
    assert torch.equal(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))


@needs_onednn
def test_engine_packs_bf16_weights_and_generates_the_same_tokens(make_llm, smollm_dir, monkeypatch):
    """The embedded SmolLM2 in bf16: every projection and the tied head packed, the plain projection
    weights gone, and greedy output token for token that of an engine with packing off."""
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    prompts = [[{"role": "user", "content": "What is the capital of France?"}],
               [{"role": "user", "content": "Name three colours of the rainbow."}]]
    packed = make_llm(smollm_dir, dtype="bfloat16", max_model_len=256)
    model = packed.engine.model
    layers = [m for m in model.modules() if isinstance(m, Linear)]
    assert len(layers) == 4 * model.shape.num_layers
    assert all(m.packed is not None and m.weight is None for m in layers)
    assert model.tied_head_packed is not None and model.embed_tokens.weight is not None
    got = [o.outputs[0].token_ids for o in packed.chat(prompts, params, use_tqdm=False)]

    monkeypatch.setattr(ops, "pack_weight", lambda weight: None)
    plain = make_llm(smollm_dir, dtype="bfloat16", max_model_len=256)
    assert plain.engine.model.layers[0].qkv_proj.weight is not None
    want = [o.outputs[0].token_ids for o in plain.chat(prompts, params, use_tqdm=False)]
    assert got == want
    assert packed.get_tokenizer().decode(got[0]).lstrip().startswith("The capital of France is Paris")
