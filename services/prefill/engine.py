"""PrefillEngine: the engine host (AsyncEngine) with the producer role's command.

`prefill` computes every prompt token but the last (decode computes that one and samples) and
streams their KV to a sink; its stream ends with a finished output once every token is computed.
"""
from __future__ import annotations

from typing import Any, AsyncIterator

from tandem.engine.kv_transfer.producer import KVSink
from tandem.server.engine_client import AsyncEngine, EngineStats


class PrefillEngine(AsyncEngine):
    def prefill(self, request_id: str, prompt_token_ids: list[int], sink: KVSink,
                skip_tokens: int = 0) -> AsyncIterator[Any]:
        self._check_alive()
        _, ids = self.engine.inputs.prompt(list(prompt_token_ids))
        if len(ids) < 2:
            raise ValueError("a one-token prompt has no KV to prefill remotely")
        if not 0 <= skip_tokens <= len(ids) - 1:
            raise ValueError(f"skip_tokens {skip_tokens} is outside the prompt ({len(ids)} tokens)")
        return self.open_stream(request_id, ("add_kv", request_id, ids[:-1], sink, skip_tokens))

    def _cmd_add_kv(self, rid: str, ids: list[int], sink: KVSink, skip_tokens: int) -> None:
        if rid in self._streams:  # else it was cancelled before it was added
            self.engine.add_kv_request(rid, ids, sink, skip_tokens)

    @property
    def num_prefilling(self) -> int:
        s: EngineStats = self.stats()
        return s.num_running + s.num_waiting
