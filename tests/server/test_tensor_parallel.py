"""`tandem serve --tensor-parallel-size 2` on CPUs, through the openai client: it serves what one process
serves, and when a rank dies the server says so (503s, /health failing) instead of hanging."""
from __future__ import annotations

import os
import signal

import openai
import pytest

from tests.server.conftest import LiveServer, make_engine


def test_a_tensor_parallel_server(tiny_model_dirs):
    one = make_engine(tiny_model_dirs["qwen2"], max_model_len=128)
    two = make_engine(tiny_model_dirs["qwen2"], max_model_len=128, tensor_parallel_size=2)
    servers = [LiveServer(one), LiveServer(two)]
    try:
        ask = dict(prompt="Tensor parallel", max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
        texts = [s.openai().completions.create(model=s.model, **ask).choices[0].text for s in servers]
        assert texts[0] == texts[1] and texts[0]
        streamed = "".join(c.choices[0].text for c in servers[1].openai().completions.create(
            model=servers[1].model, stream=True, **ask))
        assert streamed == texts[1]

        rank1 = two.engine.peers.procs[1]
        os.kill(rank1.pid, signal.SIGKILL)
        rank1.join(10)
        with pytest.raises(openai.APIStatusError) as err:
            servers[1].openai().completions.create(model=servers[1].model, **ask)
        assert err.value.status_code == 503 and "rank 1" in err.value.message
        assert servers[1].get("/health").status_code == 503
        with pytest.raises(openai.APIStatusError) as err:  # and it stays down, at once
            servers[1].openai().completions.create(model=servers[1].model, **ask)
        assert err.value.status_code == 503
        assert servers[0].get("/health").status_code == 200
    finally:
        for s in servers:
            s.stop()
        one.shutdown()
        two.shutdown()
