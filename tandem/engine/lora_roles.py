"""The engine's LoRA adapters: loaded at start or on request, unloaded when no request runs under one,
checked per request, reported in stats. A part of LLMEngine, kept apart from its loop: it uses the
engine's `model`, `runner`, `kv`, `groups`, `scheduler`, `config`, `dtype` and `device`. The adapters
themselves, and how a step applies them, are lora.py's."""
from __future__ import annotations

import os
from functools import partial
from typing import Any

from tandem.engine.lora import Adapter, LoRALayers, load_adapter
from tandem.engine.sharding import shard_lora


class LoRARoles:
    loras: LoRALayers | None = None

    def _set_loras(self, adapters: list[Adapter]) -> None:
        """The one place the adapter set changes: the projections, the runner and the KV hash keys follow."""
        layers = LoRALayers(self.model, adapters)  # attaches these to the projections, and only these
        self.loras = self.runner.loras = layers if adapters else None
        self.kv.lora_keys = layers.keys
        if self.peers:  # the other ranks load (or keep) the same adapters, in the same order
            self.peers.call("loras", [(a.name, a.path) for a in adapters])

    def _load_adapter(self, name: str, path: str) -> Adapter:
        return load_adapter(name, path, self.model.shape, self.dtype, self.device, self.config.max_lora_rank,
                            self._lora_cut())

    def _lora_cut(self):
        """Rank 0's cut of an adapter's tensors under tensor parallelism (sharding.shard_lora), else None."""
        shard = self.peers.placements[0].shard if self.peers else None
        return shard and partial(shard_lora, config=self.peers.hf_config, shard=shard)

    @property
    def lora_paths(self) -> dict[str, str]:
        """name -> folder of every adapter loaded."""
        return {a.name: a.path for a in self.loras.adapters} if self.loras else {}

    def add_lora(self, name: str, path: str) -> None:
        """Load one more adapter (the offline API's LoRARequest); a name already loaded must be the same folder."""
        known = self.lora_paths.get(name)
        if known is not None:
            if os.path.abspath(known) != os.path.abspath(path):
                raise ValueError(f"LoRA adapter {name!r} is already loaded from {known}")
            return
        self._set_loras((self.loras.adapters if self.loras else []) + [self._load_adapter(name, path)])

    def remove_lora(self, name: str) -> None:
        """Unload an adapter no request runs under (ValueError otherwise)."""
        self.check_lora(name)
        users = sum(1 for g in self.groups.values() if g.params.lora == name)
        if users:
            raise ValueError(f"LoRA adapter {name!r} is in use by {users} requests")
        self._set_loras([a for a in self.loras.adapters if a.name != name])

    def check_lora(self, name: str | None) -> None:
        if name is not None and (self.loras is None or name not in self.loras.index):
            served = ", ".join(self.lora_paths) or "none"
            raise ValueError(f"lora: unknown LoRA adapter {name!r} (this engine serves: {served})")

    def _lora_stats(self) -> dict[str, Any]:
        """EngineStats' LoRA fields (none without adapters: this runs after every step)."""
        if not self.loras:
            return {}
        return {"max_loras": self.config.scheduler.max_loras or len(self.loras.adapters),
                "running_loras": tuple(sorted({r.params.lora for r in self.scheduler.running if r.params.lora})),
                "waiting_loras": tuple(sorted({r.params.lora for r in self.scheduler.waiting if r.params.lora}))}
