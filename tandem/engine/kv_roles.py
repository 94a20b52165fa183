"""The engine's entry points for the KV transfer roles (tandem.engine.kv_transfer): the producer's
requests (compute a prompt's KV for a sink) and the consumer's (leases a producer fills, admitted
when complete). A part of LLMEngine, kept apart from its loop: it uses the engine's `producer`,
`consumer`, `scheduler`, `kv`, `groups`, `_new_group` and `_update`; the prefix KV store's side (whole
cached blocks out and in by hash) also uses `runner` and `layout`.
"""
from __future__ import annotations

import time

from tandem.engine.kv_cache.block_hash import BlockHash, hash_blocks
from tandem.engine.kv_transfer.consumer import Lease
from tandem.engine.kv_transfer.producer import KVSink
from tandem.engine.kv_transfer.store_blocks import payload_bytes, read_blocks, write_blocks
from tandem.engine.request import RequestGroup
from tandem.sampling_params import SamplingParams


class KVRoles:
    def add_kv_request(self, request_id: str, prompt_token_ids: list[int], sink: KVSink, skip_tokens: int = 0,
                       params: SamplingParams | None = None, lora: str | None = None) -> None:
        """Producer role: compute the KV of `prompt_token_ids` and stream tokens [skip_tokens, ..) to
        `sink` (see KVProducer for when chunks leave). With `params`, the last step also samples the first output token with
        them (a single sequence), which `sink.finish` receives. The request finishes ("prefilled")
        once every token is computed. `lora`: the adapter the KV is computed under (params name it when given)."""
        if self.producer is None:
            raise RuntimeError("this engine has no KV producer role")
        if params is not None and params.best_of != 1:
            raise ValueError("prefill samples the first token of a single sequence only (n = best_of = 1)")
        group = self._new_group(request_id, list(prompt_token_ids), params or SamplingParams(max_tokens=1, lora=lora), 0,
                                None)
        seq = group.seqs[0]
        seq.kv_only = True
        seq.sample_first_token = params is not None
        self.producer.attach(seq, sink, skip_tokens)
        self.scheduler.add(seq)

    def add_remote_request(self, request_id: str, prompt: list[int], params: SamplingParams, priority: int = 0,
                           arrival_time: float | None = None, *, lease_seconds: float = 30.0,
                           resume_token_ids: list[int] = (), seed_index: int = 0) -> Lease | None:
        """Consumer role: reserve the prompt's blocks under a lease that a producer fills. None when
        the cache has no room now: the request is then prefilled here like any other.

        A plain single sequence (n = 1, not resumed, no structured outputs) leases every prompt token, and the producer
        samples the first output token from the last one: the first token does not wait for a forward
        pass here. Otherwise the lease leaves the last prompt token out and this engine computes it
        and samples (forks for n > 1, a resumed sequence's seeds and penalties, a grammar's matcher)."""
        if self.consumer is None:
            raise RuntimeError("this engine has no KV consumer role")
        group = self._new_group(request_id, prompt, params, priority, arrival_time, resume_token_ids, seed_index)
        # structured outputs: the matcher lives here, so this engine samples (as for forks and resumes)
        producer_samples = (group.params.best_of == 1 and not resume_token_ids and seed_index == 0
                            and group.params.structured_outputs is None)
        lease = self.consumer.reserve(group.seqs[0], lease_seconds, producer_samples)
        if lease is None:
            self.scheduler.add(group.seqs[0])
        else:  # its blocks are held and its prefill starts elsewhere: queueing ends here, not at the KV's arrival
            group.seqs[0].first_scheduled_time = time.monotonic()
        return lease

    def prefill_locally(self, request_id: str) -> bool:
        """Consumer role: give up a request's lease and compute its prompt here instead."""
        group = self.groups.get(request_id)
        seq = group.seqs[0] if group else None
        if seq is None or self.consumer is None or self.consumer.release(seq) is None:
            return False
        self.kv.free(seq)
        seq.num_cached_tokens = -1
        seq.first_scheduled_time = None  # it queues here now, like any local request
        self.scheduler.add(seq)
        return True

    def expired_leases(self) -> list[str]:
        """Request ids whose lease ran out before their KV arrived (the caller aborts them)."""
        if self.consumer is None:
            return []
        return [lease.request.group.request_id for lease in self.consumer.expired(time.monotonic())]

    def block_hashes(self, token_ids: list[int], lora: str | None = None) -> list[BlockHash]:
        """The prefix-cache hashes of every full block of `token_ids` (as a request of them gets)."""
        return hash_blocks(token_ids, self.kv.block_size, self.kv.seed_of(lora))

    def export_blocks(self, hashes: list[BlockHash]) -> list[tuple[BlockHash, bytes]]:
        """(hash, payload) of each of these blocks the prefix cache holds now (engine thread)."""
        found = [(h, block) for h in hashes if (block := self.kv.pool.lookup(h)) is not None]
        payloads = read_blocks(self.wire_caches, [b.block_id for _, b in found], self.kv.block_size)
        return [(h, p) for (h, _), p in zip(found, payloads)]

    def import_blocks(self, held: list[BlockHash], hashes: list[BlockHash], payloads: list[bytes]) -> int:
        """Blocks loaded from the store into the prefix cache, free (evictable) and cached under their
        hashes, so the next request with that prefix finds them as if computed here (engine thread).
        `held`: the prefix before them that this cache holds; it, and any of `hashes` cached already,
        is kept from eviction meanwhile (or the chain could break at its start). Fills at most the free
        blocks but one, and frees the new blocks last-first, so eviction takes a chain from its end.
        Returns how many blocks were written."""
        pool, size = self.kv.pool, payload_bytes(self.layout)
        if not self.kv.enable_caching:
            return 0
        for payload in payloads:
            if len(payload) != size:
                raise ValueError(f"a stored KV block of {len(payload)} bytes, this layout's are {size}")
        kept = [block for h in [*held, *hashes] if (block := pool.lookup(h)) is not None]
        pool.touch(kept)
        blocks = []
        try:
            todo = [(h, p) for h, p in zip(hashes, payloads) if pool.lookup(h) is None][:max(0, pool.num_free - 1)]
            blocks = pool.allocate(len(todo))
            write_blocks(self.wire_caches, [b.block_id for b in blocks], self.kv.block_size,
                         [p for _, p in todo])
            for block, (h, _) in zip(blocks, todo):
                pool.cache(block, h)
        finally:
            pool.free(blocks[::-1])
            pool.free(kept[::-1])
        return len(blocks)

    def _admit_loaded(self) -> dict[str, RequestGroup]:
        """Requests whose KV arrived join the scheduler; those that came with their first token
        take it first (it may finish them). Returns the groups that got a token."""
        touched: dict[str, RequestGroup] = {}
        now = time.monotonic()
        for lease in self.consumer.take_complete():
            req = lease.request
            self.kv.publish(req, lease.num_tokens)
            req.num_computed_tokens = lease.num_tokens
            if lease.first is not None:
                if req.first_scheduled_time is None:
                    req.first_scheduled_time = now
                self._update(req, lease.first, now)
                touched[req.group.request_id] = req.group
            if not req.finished:
                self.scheduler.add(req)
        return touched
