"""Schemathesis against the server's own OpenAPI document: generated requests (valid and invalid)
for every operation, none may get a 5xx, and every error is OpenAI-shaped (Anthropic-shaped on /v1/messages). Bounded: a fixed,
derandomized set of examples per operation on a tiny model with a 64-token context.

Operations are driven through hypothesis directly (`operation.as_strategy()`), not schemathesis'
pytest plugin, which breaks on pytest 9."""
from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from tests.server.conftest import make_engine

EXAMPLES_PER_OPERATION = 30


@pytest.fixture(scope="module")
def fuzz_server(tiny_model_dirs, serve):
    engine = make_engine(tiny_model_dirs["qwen2"], max_model_len=64, num_blocks=1024, model_name="fuzz")
    server = serve(engine)
    yield server
    server.wait_idle(timeout=30)
    engine.shutdown()


def check(case) -> None:
    response = case.call(timeout=60)
    assert response.status_code < 500, f"{case.method} {case.path} -> {response.status_code}: {response.text[:500]}"
    assert response.status_code != 422, "validation errors must be OpenAI-shaped 400s"
    if response.status_code >= 400 and case.path.startswith("/v1/messages"):
        body = response.json()
        assert body["type"] == "error" and {"message", "type"} <= set(body["error"]) and body["error"]["message"]
    elif response.status_code >= 400:
        error = response.json()["error"]
        assert {"message", "type", "param", "code"} <= set(error) and error["message"]


def test_no_server_errors(fuzz_server):
    schema = schemathesis.openapi.from_url(fuzz_server.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 8, [op.label for op in operations]
    for op in operations:
        @given(case=op.as_strategy())
        @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def run(case) -> None:
            check(case)

        run()
