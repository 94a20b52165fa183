"""LoRA adapters (tandem/engine/lora.py): greedy output under an adapter equals transformers' on the model
with that adapter merged into its weights (float32), with adapters and the base model mixed in one batch,
chunked prompts beside decode rows, and prefix caching that never hands one adapter's KV to another."""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from tandem import LoRARequest, SamplingParams
from tests.conftest import skip_unless_ranks_fit

NEW_TOKENS = 16
# PEFT's module -> where transformers' Llama keeps it
MODULES = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
           "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


def make_adapter(base: str, out: str, seed: int, targets: tuple[str, ...], rank: int = 4, alpha: float = 8.0,
                 rslora: bool = False) -> dict[str, torch.Tensor]:
    """A random PEFT LoRA folder for `base`; returns the merged weight deltas by HF parameter name."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(base)
    g = torch.Generator().manual_seed(seed)
    head = cfg.hidden_size // cfg.num_attention_heads
    dims = {"q_proj": (cfg.hidden_size, cfg.num_attention_heads * head),
            "k_proj": (cfg.hidden_size, cfg.num_key_value_heads * head),
            "v_proj": (cfg.hidden_size, cfg.num_key_value_heads * head),
            "o_proj": (cfg.num_attention_heads * head, cfg.hidden_size),
            "gate_proj": (cfg.hidden_size, cfg.intermediate_size), "up_proj": (cfg.hidden_size, cfg.intermediate_size),
            "down_proj": (cfg.intermediate_size, cfg.hidden_size)}
    scale = alpha / (rank ** 0.5 if rslora else rank)
    tensors, deltas = {}, {}
    for layer in range(cfg.num_hidden_layers):
        for module in targets:
            d_in, d_out = dims[module]
            a = torch.randn(rank, d_in, generator=g) * 0.2
            b = torch.randn(d_out, rank, generator=g) * 0.2
            name = f"model.layers.{layer}.{MODULES[module]}.{module}"
            tensors[f"base_model.model.{name}.lora_A.weight"] = a
            tensors[f"base_model.model.{name}.lora_B.weight"] = b
            deltas[f"{name}.weight"] = scale * b @ a
    os.makedirs(out, exist_ok=True)
    save_file(tensors, os.path.join(out, "adapter_model.safetensors"))
    with open(os.path.join(out, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": list(targets),
                   "bias": "none", "use_rslora": rslora}, f)
    return deltas


def merged_greedy(base: str, deltas: dict[str, torch.Tensor] | None, prompts: list[list[int]]) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    if deltas:
        state = model.state_dict()
        with torch.no_grad():
            for name, delta in deltas.items():
                state[name] += delta
    outs = []
    with torch.no_grad():
        for ids in prompts:
            x = torch.tensor([ids])
            y = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=NEW_TOKENS,
                               min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=2)
            outs.append(y[0, len(ids):].tolist())
    return outs


@pytest.fixture(scope="module")
def adapters(tiny_model_dirs, tmp_path_factory):
    """Two adapters on the tiny Llama (attention only; every projection, rsLoRA) and the references."""
    base = tiny_model_dirs["llama"]
    root = tmp_path_factory.mktemp("loras")
    g = torch.Generator().manual_seed(5)
    shared = torch.randint(3, 49000, (40,), generator=g).tolist()
    prompts = [shared + torch.randint(3, 49000, (n,), generator=g).tolist() for n in (3, 21, 50)]
    attn = make_adapter(base, str(root / "attn"), 1, ("q_proj", "k_proj", "v_proj", "o_proj"))
    full = make_adapter(base, str(root / "full"), 2, tuple(MODULES), rank=8, alpha=4.0, rslora=True)
    expected = {name: merged_greedy(base, deltas, prompts)
                for name, deltas in (("base", None), ("attn", attn), ("full", full))}
    assert expected["attn"] != expected["base"] and expected["full"] != expected["base"]  # the adapters matter
    return base, root, prompts, expected


PARAMS = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS)


def _run(llm, prompts, loras) -> list[list[int]]:
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], PARAMS, use_tqdm=False, lora_request=loras)
    return [o.outputs[0].token_ids for o in outs]


# whole prompts, and chunks beside decode rows; over two tensor-parallel ranks, each applying its cut of every
# adapter (B cut like q/k/v and gate/up's outputs, A like o and down's inputs, inside their partial sums); and over
# two pipeline stages, each applying the adapter's layers it holds
@pytest.mark.parametrize("budget, tp, pp", [(2048, 1, 1), (24, 1, 1), (24, 2, 1), (24, 1, 2)])
def test_adapters_and_the_base_model_in_one_batch(adapters, make_llm, budget, tp, pp):
    skip_unless_ranks_fit(tp * pp)
    base, root, prompts, expected = adapters
    llm = make_llm(base, enable_lora=True, max_num_batched_tokens=budget, tensor_parallel_size=tp,
                   pipeline_parallel_size=pp)
    attn, full = LoRARequest("attn", 1, str(root / "attn")), LoRARequest("full", 2, str(root / "full"))
    order = [None, attn, full] * len(prompts)  # every prompt under each, all at once
    got = _run(llm, [p for p in prompts for _ in range(3)], order)
    want = [expected[name][i] for i in range(len(prompts)) for name in ("base", "attn", "full")]
    assert got == want
    llm.engine.remove_lora("attn")  # every rank drops it; "full" moves to index 0 everywhere
    assert _run(llm, prompts[:1], [full]) == expected["full"][:1]


def test_prefixes_are_shared_only_under_one_adapter(adapters, make_llm):
    base, root, prompts, expected = adapters
    llm = make_llm(base, enable_prefix_caching=True)
    attn = LoRARequest("attn", 1, str(root / "attn"))
    assert _run(llm, prompts, None) == expected["base"]
    base_hits = llm.engine.kv.prefix_hits  # the shared 40 tokens, reused within the batch
    assert base_hits > 0
    assert _run(llm, prompts, attn) == expected["attn"]  # the base model's cached KV is not the adapter's
    assert llm.engine.kv.prefix_hits == 2 * base_hits  # only what the adapter's own batch shared
    assert _run(llm, prompts, attn) == expected["attn"]
    assert llm.engine.kv.prefix_hits > 3 * base_hits  # now the adapter's cached prompts


def test_bad_adapters_are_refused_by_name(adapters, make_llm, tmp_path):
    base, root, prompts, _ = adapters
    llm = make_llm(base)
    with pytest.raises(ValueError, match=r"lora: unknown LoRA adapter 'nope'"):
        llm.generate("hi", SamplingParams(max_tokens=2, lora="nope"))
    with pytest.raises(ValueError, match="not a PEFT LoRA folder"):
        llm.generate("hi", PARAMS, lora_request=LoRARequest("empty", 3, str(tmp_path)))
    make_adapter(base, str(tmp_path / "big"), 3, ("q_proj",), rank=128)
    with pytest.raises(ValueError, match="rank 128 is over max_lora_rank 64"):
        llm.generate("hi", PARAMS, lora_request=LoRARequest("big", 4, str(tmp_path / "big")))
    for change, words in ((dict(r=None), "r must be an integer >= 1"), (dict(alpha_pattern={"q_proj": 2}), "alpha_pattern"),
                          (dict(use_dora=True), "use_dora")):
        path = tmp_path / f"cfg-{words[:5]}"
        make_adapter(base, str(path), 3, ("q_proj",))
        config = json.loads((path / "adapter_config.json").read_text())
        (path / "adapter_config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(ValueError, match=words):
            llm.generate("hi", PARAMS, lora_request=LoRARequest(words, 5, str(path)))
    wide = tmp_path / "wide"  # an adapter for a model of another width: refused at load, not in a step
    make_adapter(base, str(wide), 3, ("o_proj",))
    tensors = {k: torch.cat([v, v], dim=1) if "lora_A" in k else v
               for k, v in load_file(str(wide / "adapter_model.safetensors")).items()}
    save_file(tensors, str(wide / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="for another model"):
        llm.generate("hi", PARAMS, lora_request=LoRARequest("wide", 6, str(wide)))
    with pytest.raises(ValueError, match="already loaded from"):
        llm.generate("hi", PARAMS, lora_request=LoRARequest("attn", 1, str(root / "attn")))
        llm.generate("hi", PARAMS, lora_request=LoRARequest("attn", 1, str(root / "full")))


def test_adapter_prompts_stay_out_of_prompt_lanes(adapters, make_llm, monkeypatch):
    """Under lof, prompt chunks ride in multi-step lookaheads beside greedy decode rows (prompt_lanes.py):
    a prompt under an adapter must not, as the graphed lanes run the base model only."""
    monkeypatch.setenv("TANDEM_ATTENTION_BACKEND", "triton")
    base, root, prompts, expected = adapters
    llm = make_llm(base, num_scheduler_steps=8, max_num_batched_tokens=64, scheduling_policy="lof")
    attn = LoRARequest("attn", 1, str(root / "attn"))
    longer = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS)
    shorter = SamplingParams(temperature=0.0, max_tokens=8, min_tokens=8)  # lof paces these in beside the others
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts * 2], [longer] * 3 + [shorter] * 3,
                        use_tqdm=False, lora_request=[None] * 3 + [attn] * 3)
    assert [o.outputs[0].token_ids for o in outs] == expected["base"] + [e[:8] for e in expected["attn"]]
    assert llm.stats().num_lookahead_steps > 0


def test_an_adapter_retrained_under_its_name_gets_new_kv_hashes(adapters, make_llm, tmp_path):
    """KV hashes chain on the adapter's name and a digest of its files: a KV store shared across restarts
    never hands a retrained adapter the old one's KV."""
    base, root, prompts, _ = adapters
    before, after = make_llm(base), make_llm(base)
    before.generate("hi", PARAMS, lora_request=LoRARequest("sql", 1, str(root / "attn")))
    make_adapter(base, str(tmp_path / "sql"), 9, ("q_proj", "k_proj", "v_proj", "o_proj"))  # same shapes, new weights
    after.generate("hi", PARAMS, lora_request=LoRARequest("sql", 1, str(tmp_path / "sql")))
    old, new, plain = (llm.engine.block_hashes(prompts[0], lora) for llm, lora in
                       ((before, "sql"), (after, "sql"), (before, None)))
    assert len(old) == 2 and old != new and old != plain and new != plain
    assert after.engine.block_hashes(prompts[0], None) == plain
    with pytest.raises(ValueError, match="unknown LoRA adapter 'chat'"):
        before.engine.block_hashes(prompts[0], "chat")


def test_an_adapter_in_use_is_not_unloaded(adapters, make_llm):
    base, root, prompts, expected = adapters
    llm = make_llm(base)
    assert _run(llm, prompts[:1], LoRARequest("attn", 1, str(root / "attn"))) == expected["attn"][:1]
    llm.engine.add_request("r1", {"prompt_token_ids": prompts[0]}, PARAMS.clone(lora="attn"))
    with pytest.raises(ValueError, match="in use by 1 requests"):
        llm.engine.remove_lora("attn")
    llm.engine.abort_request("r1")
    llm.engine.remove_lora("attn")
    assert all(getattr(layer, p).lora is None for layer in llm.engine.model.layers
               for p in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"))
    assert _run(llm, prompts[:1], None) == expected["base"][:1]


def test_max_loras_bounds_the_adapters_running_at_once(adapters, make_llm):
    """vLLM's max_loras: with 1, requests under the other adapter wait while one runs, and base-model requests
    behind them pass them; every output is still its adapter's."""
    base, root, prompts, expected = adapters
    llm = make_llm(base, max_loras=1, max_num_batched_tokens=2048)
    for name in ("attn", "full"):
        llm.engine.add_lora(name, str(root / name))
    order = [("attn", 0), ("full", 0), (None, 0), ("attn", 1), ("full", 1)]
    for i, (name, p) in enumerate(order):
        llm.engine.add_request(f"r{i}", {"prompt_token_ids": prompts[p]}, PARAMS.clone(lora=name))
    together, outs, first_step = [], {}, None
    while llm.engine.has_unfinished_requests():
        for out in llm.engine.step():
            if out.finished:
                outs[out.request_id] = out.outputs[0].token_ids
        running = {r.params.lora for r in llm.engine.scheduler.running}
        first_step = first_step or running
        together.append(len(running - {None}))
    assert max(together) == 1 and first_step == {"attn", None}  # the base request passed "full"'s
    assert [outs[f"r{i}"] for i in range(len(order))] == [expected[name or "base"][p] for name, p in order]
    assert llm.engine.stats().max_loras == 1
