"""LoRA adapters over the OpenAI API (`tandem serve --lora-modules name=path`): each adapter is a model of its
own name in /v1/models (its parent the base model), and a request naming it gets the adapter's output, equal
to transformers' on the merged weights, streamed or not, beside base-model requests."""
from __future__ import annotations

import asyncio
import os

import openai
import pytest

from tandem.cli import parse_args
from tandem.config import EngineConfig
from tests.engine.test_lora import NEW_TOKENS, make_adapter, merged_greedy
from tests.server.conftest import make_engine


@pytest.fixture(scope="module")
def lora_server(tiny_model_dirs, tmp_path_factory, serve):
    base = tiny_model_dirs["llama"]
    root = tmp_path_factory.mktemp("served-loras")
    deltas = make_adapter(base, str(root / "sql"), 7, ("q_proj", "v_proj", "down_proj"))
    prompt = list(range(100, 140))
    expected = {"base": merged_greedy(base, None, [prompt])[0], "sql": merged_greedy(base, deltas, [prompt])[0]}
    assert expected["sql"] != expected["base"]
    engine = make_engine(base, model_name="tiny-llama", num_blocks=64, lora_modules={"sql": str(root / "sql")})
    yield serve(engine), prompt, expected, str(root / "sql")
    engine.shutdown()


def test_adapters_are_models_of_their_own(lora_server):
    server, prompt, expected, path = lora_server
    cards = {m.id: m for m in server.openai().models.list().data}
    assert set(cards) == {"tiny-llama", "sql"}
    assert cards["sql"].model_extra["parent"] == "tiny-llama" and cards["sql"].model_extra["root"] == path


def test_a_request_runs_under_the_adapter_it_names(lora_server):
    server, prompt, expected, _ = lora_server
    client = server.async_openai()

    async def one(model: str, stream: bool) -> list[str]:
        kwargs = dict(model=model, prompt=prompt, max_tokens=NEW_TOKENS, temperature=0, logprobs=0,
                      extra_body={"min_tokens": NEW_TOKENS})
        if not stream:
            return (await client.completions.create(**kwargs)).choices[0].logprobs.tokens
        return [t for c in [c async for c in await client.completions.create(stream=True, **kwargs)]
                for t in (c.choices[0].logprobs.tokens if c.choices and c.choices[0].logprobs else [])]

    async def all_at_once():  # the adapter's requests and the base model's share batches
        return await asyncio.gather(*(one(m, s) for m in ("sql", "tiny-llama") for s in (False, True)))

    got = asyncio.run(all_at_once())
    want = {m: [server.app.state.ctx.token_text(t) for t in expected[k]] for m, k in (("sql", "sql"),
                                                                                     ("tiny-llama", "base"))}
    assert got == [want["sql"], want["sql"], want["tiny-llama"], want["tiny-llama"]]


def test_the_adapters_in_use_are_a_metric(lora_server):
    """vLLM's lora_requests_info (here tandem:lora_requests_info), which LoRA-aware routers read."""
    server, prompt, _, _ = lora_server

    def info() -> dict[str, str]:
        (key,) = [k for k in server.metrics() if k.startswith("tandem:lora_requests_info{")]
        return dict(part.split("=", 1) for part in key[len("tandem:lora_requests_info{"):-1].split('",'))

    idle = info()
    assert idle["max_lora"].strip('"') == "1" and idle["running_lora_adapters"].strip('"') == ""
    stream = server.openai().completions.create(model="sql", prompt=prompt, max_tokens=400, temperature=0,
                                                stream=True, extra_body={"ignore_eos": True})
    next(iter(stream))  # running now
    assert info()["running_lora_adapters"].strip('"') == "sql"
    stream.close()


def test_an_unknown_adapter_is_a_404(lora_server):
    server, prompt, _, _ = lora_server
    with pytest.raises(openai.NotFoundError, match="sql2"):
        server.openai().completions.create(model="sql2", prompt=prompt, max_tokens=2)


def test_lora_flags(tmp_path):
    _, args = parse_args(["serve", "--lora-modules", "sql=/a/sql", '{"name": "chat", "path": "/a/chat"}',
                          "--enable-lora", "--max-lora-rank", "16"])
    config = EngineConfig.from_args(args)
    assert config.lora_modules == {"sql": "/a/sql", "chat": "/a/chat"} and config.max_lora_rank == 16
    cfg = tmp_path / "serve.yaml"
    cfg.write_text('lora-modules: ["sql=/a/sql", {"name": "chat", "path": "/a/chat"}]\n')
    _, args = parse_args(["serve", "--config", str(cfg)])
    assert dict(args.lora_modules) == {"sql": "/a/sql", "chat": "/a/chat"}
    from tandem.launcher import lora_flags

    _, args = parse_args(["up", "--lora-modules", "sql=adapters/sql"])  # every worker gets it, path made absolute
    assert lora_flags(args.lora_modules) == ["--lora-modules", f"sql={os.path.abspath('adapters/sql')}"]
    for bad in ("sql", "=/a", '{"name": "x"}'):
        with pytest.raises(SystemExit):
            parse_args(["serve", "--lora-modules", bad])


def test_adapters_load_and_unload_while_serving(tiny_model_dirs, tmp_path, serve):
    """vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter, behind --allow-runtime-lora-updating."""
    import httpx

    from tandem.server.config import ServerConfig

    base = tiny_model_dirs["llama"]
    deltas = make_adapter(base, str(tmp_path / "sql"), 7, ("q_proj", "v_proj", "down_proj"))
    prompt = list(range(100, 140))
    want = merged_greedy(base, deltas, [prompt])[0]
    engine = make_engine(base, model_name="tiny-llama", num_blocks=64)
    try:
        server = serve(engine, ServerConfig(allow_runtime_lora_updating=True))
        client = server.openai()

        def run(model: str) -> list[str]:
            r = client.completions.create(model=model, prompt=prompt, max_tokens=NEW_TOKENS, temperature=0, logprobs=0,
                                          extra_body={"min_tokens": NEW_TOKENS})
            return r.choices[0].logprobs.tokens

        load = server.post("/v1/load_lora_adapter", json={"lora_name": "sql", "lora_path": str(tmp_path / "sql")})
        assert load.status_code == 200 and "added" in load.text
        assert {m.id for m in client.models.list().data} == {"tiny-llama", "sql"}
        assert run("sql") == [server.app.state.ctx.token_text(t) for t in want]
        for body, param in (({"lora_name": "sql", "lora_path": str(tmp_path / "sql")}, "lora_name"),  # again
                            ({"lora_name": "chat", "lora_path": str(tmp_path / "none")}, "lora_path"),
                            ({"lora_name": "tiny-llama", "lora_path": str(tmp_path / "sql")}, "lora_name")):
            bad = server.post("/v1/load_lora_adapter", json=body)
            assert bad.status_code == 400 and bad.json()["error"]["param"] == param, bad.text
        assert server.post("/v1/unload_lora_adapter", json={"lora_name": "sql"}).status_code == 200
        with pytest.raises(openai.NotFoundError):
            run("sql")
        assert server.post("/v1/unload_lora_adapter", json={"lora_name": "sql"}).status_code == 400
        assert engine.engine.loras is None and engine.engine.kv.lora_keys == {}
        plain = serve(engine)  # off by default: the routes do not exist
        assert httpx.post(plain.url + "/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "y"}).status_code == 404
    finally:
        engine.shutdown()
