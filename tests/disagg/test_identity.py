"""Greedy output through the disaggregated stack (router + prefill + decode processes, as `tandem
up` starts them) equals colocated `tandem serve`, token for token, for 1+1 and 2+2 workers; both
the remote-prefill and the decode-local paths are taken, structured outputs and the Responses API included."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.disagg.conftest import ServeProcess, total

PROMPTS = [
    "The capital of France is",
    "Hi",
    "Write a short story about a robot who learns to paint. Once upon a time, in a small workshop at the edge "
    "of a quiet town, there lived a robot named",
    "List three fruits:",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "In 1969, the first humans landed on the Moon. The mission was called Apollo 11 and the astronauts were "
    "Neil Armstrong, Buzz Aldrin and Michael Collins. Describe what they did on the surface:",
]
CHATS = [[{"role": "user", "content": "What is the tallest mountain on Earth? Answer in one sentence."}],
         [{"role": "system", "content": "You are a terse assistant."},
          {"role": "user", "content": "Name two primary colors."}]]
# 16 tokens: every request opens a KV block on the decode side after its transfer, whatever its prompt length
NEW_TOKENS = 16
KW = dict(max_tokens=NEW_TOKENS, temperature=0, logprobs=1)


def run_all(client, model: str) -> list:
    out = []
    for p in PROMPTS:
        r = client.completions.create(model=model, prompt=p, **KW)
        c = r.choices[0]
        out.append((c.text, c.logprobs.tokens, c.finish_reason, r.usage.completion_tokens))
    for m in CHATS:
        r = client.chat.completions.create(model=model, messages=m, max_tokens=NEW_TOKENS, temperature=0)
        out.append((r.choices[0].message.content, r.choices[0].finish_reason, r.usage.completion_tokens))
    # best_of > n: the best 2 of 4 seeded samples, numbered 0 and 1, for each of two prompts
    r = client.completions.create(model=model, prompt=PROMPTS[:2], n=2, best_of=4, seed=1, temperature=1,
                                  max_tokens=8)
    out.append(([(c.index, c.text, c.finish_reason) for c in r.choices], r.usage.completion_tokens))
    stream = client.completions.create(model=model, prompt=PROMPTS[2], stream=True,
                                       max_tokens=NEW_TOKENS, temperature=0)
    out.append("".join(ch.choices[0].text for ch in stream if ch.choices))
    # structured outputs: decode holds the matcher, so it samples even the first token of a remote prefill
    choices = ["a robot", "a painter", "a lighthouse keeper"]
    r = client.completions.create(model=model, prompt=PROMPTS[2], max_tokens=NEW_TOKENS, temperature=0,
                                  extra_body={"structured_outputs": {"choice": choices}})
    assert r.choices[0].text in choices
    # its third time: the prefix cache that held it (decode's, or the prefill worker's when prefilled remotely)
    assert r.usage.prompt_tokens_details.cached_tokens > 0
    out.append(r.choices[0].text)
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": PROMPTS[5]}], seed=2,
                                       max_tokens=NEW_TOKENS, temperature=0.8, response_format={"type": "json_object"})
    out.append((r.choices[0].message.content, r.choices[0].finish_reason))
    # the Responses API: the first chat again, as instructions and input, streamed
    events = list(client.responses.create(model=model, instructions=CHATS[1][0]["content"], input=CHATS[1][1]["content"],
                                          max_output_tokens=NEW_TOKENS, temperature=0, stream=True))
    final = events[-1].response
    out.append((final.output_text, final.status, final.usage.output_tokens))
    return out


@pytest.fixture(scope="module")
def colocated(tiny_model_dirs):
    """Each model's answers from colocated `tandem serve`, computed once."""
    cache = {}

    def answers(model: str | None) -> list:
        if model not in cache:
            serve = ServeProcess(model, ["--max-num-batched-tokens", "512", "--num-gpu-blocks-override", "1024"])
            try:
                cache[model] = run_all(serve.openai(), model or "SmolLM2-135M-Instruct")
            finally:
                serve.close()
        return cache[model]

    return answers


# the embedded SmolLM2 on 1 + 1 workers; a tiny random Llama on 2 + 2 (same code path, faster to run)
@pytest.mark.parametrize("embedded,prefill,decode", [(True, 1, 1), (False, 2, 2)])
def test_disaggregated_equals_colocated(stack_factory, colocated, tiny_model_dirs, embedded, prefill, decode):
    model = None if embedded else tiny_model_dirs["llama"]
    # 2 + 2 also shares prefixes through a KV store (`tandem up --kv-store-bytes`): what prefill workers load
    # from it must change nothing
    s = stack_factory(model, prefill, decode, worker_args=["--num-gpu-blocks-override", "1024"],  # as colocated
                      kv_store_bytes=None if embedded else 64 << 20)
    want = colocated(model)
    assert run_all(s.openai(), model or "SmolLM2-135M-Instruct") == want
    if embedded:  # real text: both ends compared, a request stopping on EOS and ones cut at max_tokens
        assert {answer[2] for answer in want[:len(PROMPTS)]} == {"stop", "length"}
    m = s.metrics()
    assert total(m, "tandem:router_prefill_decisions_total", decision="remote") >= 4
    assert total(m, "tandem:router_prefill_decisions_total", decision="local") >= 1  # "Hi" is under the threshold
    assert total(m, "tandem:kv_transfers_total", outcome="success") >= 4
    if decode == 2:
        # requests at once spread over both decode workers: each pick counts the router's own requests in
        # flight (the sequential ones above may all land on one: a worker's heartbeat load lags by up to an
        # interval, so which one looks idler between them is a matter of timing)
        before = [total(s.metrics(f"decode-{i}"), "tandem:kv_transfers_total") for i in range(2)]
        client = s.openai()
        with ThreadPoolExecutor(4) as pool:  # 128 tokens each: long enough to overlap however the threads start
            list(pool.map(lambda p: client.completions.create(model=model, prompt=p, max_tokens=128, temperature=0,
                                                              extra_body={"ignore_eos": True}),
                          [f"{PROMPTS[5]} ({i})" for i in range(4)]))
        served = [total(s.metrics(f"decode-{i}"), "tandem:kv_transfers_total") - before[i] for i in range(2)]
        assert all(n >= 1 for n in served), served
        prefills = [s.metrics(f"prefill-{i}") for i in range(2)]
        assert sum(total(m, "tandem:kv_store_blocks_total", direction="save") for m in prefills) >= 4
        assert sum(total(m, "tandem:kv_store_failures_total") for m in prefills) == 0
        assert total(s.metrics("kvstore"), "tandem:kvstore_puts_total") >= 4
        assert total(s.metrics(), "tandem:router_kv_store_blocks") >= 4  # the router follows the store's events
