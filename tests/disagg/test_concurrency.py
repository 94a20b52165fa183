"""64 concurrent streams through a 2 prefill + 2 decode stack all finish with the colocated engine's
greedy text and the right usage; afterwards no worker holds a KV block."""
from __future__ import annotations

import asyncio

import torch

from tandem import LLM, SamplingParams
from tests.disagg.conftest import total


def test_64_concurrent_streams(stack_factory, tiny_model_dirs):
    model = tiny_model_dirs["llama"]
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 49000, (int(n),), generator=g).tolist() for n in torch.randint(2, 120, (64,), generator=g)]
    want = LLM(model, dtype="float32").generate(
        [{"prompt_token_ids": p} for p in prompts], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True),
        use_tqdm=False)
    s = stack_factory(model, 2, 2, worker_args=["--max-num-seqs", "64"])

    async def one(client, i):
        text, usage = "", None
        stream = await client.completions.create(
            model=model, prompt=prompts[i], max_tokens=16, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        async for chunk in stream:
            text += "".join(c.text for c in chunk.choices)
            usage = chunk.usage or usage
        return text, usage

    async def run_all():
        client = s.async_openai()
        try:
            return await asyncio.gather(*(one(client, i) for i in range(64)))
        finally:
            await client.close()

    results = asyncio.run(run_all())
    for i, (text, usage) in enumerate(results):
        assert text == want[i].outputs[0].text, f"stream {i} differs"
        assert usage.completion_tokens == 16 and usage.prompt_tokens == len(prompts[i])
    m = s.metrics()
    assert total(m, "tandem:router_prefill_decisions_total", decision="remote") > 32
    assert total(m, "tandem:request_success_total") == 64
    per_decode = [total(s.metrics(f"decode-{i}"), "tandem:kv_transfers_total") for i in range(2)]
    assert all(n > 0 for n in per_decode), f"one decode worker got no remote prefill: {per_decode}"
