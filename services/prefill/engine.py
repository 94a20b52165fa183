"""PrefillEngine: the engine host (AsyncEngine) with the producer role's command.

`prefill` computes a prompt and streams its KV to a sink: with sampling parameters, the KV of every
prompt token and the first output token sampled from the last one (decode continues from it);
without, the KV of all but the last token (decode computes that one and samples); `kv_token_ids`
says which tokens those are. Its stream ends with a finished output once every token is computed.
"""
from __future__ import annotations

from typing import Any, AsyncIterator

from tandem.engine.kv_transfer.producer import KVSink
from tandem.sampling_params import SamplingParams
from tandem.server.engine_client import AsyncEngine, EngineStats


class PrefillEngine(AsyncEngine):
    def kv_token_ids(self, prompt_token_ids: list[int], skip_tokens: int = 0,
                     params: SamplingParams | None = None, lora: str | None = None) -> list[int]:
        """The tokens whose KV `prefill` computes for this prompt, after the request's checks (ValueError)."""
        self._check_alive()
        _, ids = self.engine.inputs.prompt(list(prompt_token_ids))
        self.engine.check_params(params or SamplingParams(lora=lora))
        if params is None:
            if len(ids) < 2:
                raise ValueError("a one-token prompt has no KV to prefill remotely")
            ids = ids[:-1]
        else:
            if params.best_of != 1:
                raise ValueError("prefill samples the first token of a single sequence only (n = best_of = 1)")
        if not 0 <= skip_tokens <= len(ids) - 1:
            raise ValueError(f"skip_tokens {skip_tokens} is outside the KV wanted ({len(ids)} tokens)")
        return ids

    def prefill(self, request_id: str, ids: list[int], sink: KVSink, skip_tokens: int = 0,
                params: SamplingParams | None = None, lora: str | None = None) -> AsyncIterator[Any]:
        """Computes `ids` (from `kv_token_ids`) and streams their KV from `skip_tokens` on to `sink`."""
        return self.open_stream(request_id, ("add_kv", request_id, ids, sink, skip_tokens, params, lora))

    def _cmd_add_kv(self, rid: str, ids: list[int], sink: KVSink, skip_tokens: int,
                    params: SamplingParams | None, lora: str | None) -> None:
        if rid in self._streams:  # else it was cancelled before it was added
            self.engine.add_kv_request(rid, ids, sink, skip_tokens, params, lora)

    @property
    def num_prefilling(self) -> int:
        s: EngineStats = self.stats()
        return s.num_running + s.num_waiting
