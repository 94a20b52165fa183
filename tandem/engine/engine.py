"""LLMEngine: one loop of schedule -> execute -> update over the paged KV cache."""
from __future__ import annotations

import logging
import time
from typing import Any

import torch

from tandem.config import EngineConfig, default_dtype, parse_dtype, resolve_device
from tandem.engine import loader, prompt_lanes
from tandem.engine.attention import attention_backend
from tandem.inputs import InputChecker
from tandem.engine.cpu_tuning import available_memory, tune_host_allocator
from tandem.kernels import cpu as cpu_kernels
from tandem.engine.kv_cache.manager import KVCacheManager
from tandem.engine.kv_roles import KVRoles
from tandem.engine.lookaheads import Lookaheads
from tandem.engine.lora_roles import LoRARoles
from tandem.engine.kv_transfer.consumer import KVConsumer
from tandem.engine.kv_transfer.codec import LocalCaches
from tandem.engine.kv_transfer.layout import describe
from tandem.engine.kv_transfer.producer import KVProducer, stream_layerwise
from tandem.engine.model_runner import ModelRunner
from tandem.engine.models import model_class
from tandem.engine.request import Request, RequestGroup
from tandem.engine.sampler import Sample
from tandem.engine.group_caches import GroupCaches
from tandem.engine.parallel_group import start_group
from tandem.engine.pipeline import Pipeline
from tandem.engine.scheduler import Scheduler, SchedulerOutput
from tandem.engine.structured import GrammarBook
from tandem.outputs import CompletionOutput, EngineStats, RequestMetrics, RequestOutput
from tandem.sampling_params import SamplingParams
from tandem.tokenizer import IncrementalDetokenizer, NoDetokenizer, eos_token_ids, find_stop, load_tokenizer, sampling_defaults

log = logging.getLogger("tandem.engine")

class LLMEngine(KVRoles, Lookaheads, LoRARoles):
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.model_path = loader.resolve_model(config.model)
        hf_config = loader.load_config(self.model_path)
        cls = model_class(hf_config)
        self.device = resolve_device(config.device)
        self.dtype = parse_dtype(config.dtype, default=default_dtype(hf_config, self.device))
        if self.device.type == "cpu":
            tune_host_allocator()
            # Build (or load) the C++ kernels now, before the engine serves: a first build inside a
            # request's step stalls it for seconds (a worker's remote-prefill lease can expire meanwhile).
            cpu_kernels.available()
        limit = hf_config.get("max_position_embeddings", 4096)
        self.max_model_len = config.max_model_len or limit
        if self.max_model_len > limit:
            raise ValueError(f"max_model_len ({self.max_model_len}) exceeds the model's "
                             f"max_position_embeddings ({limit})")
        sched = config.scheduler
        if not sched.enable_chunked_prefill and sched.max_num_batched_tokens < self.max_model_len:
            raise ValueError(f"without chunked prefill a prompt runs in one step: max_num_batched_tokens "
                             f"({sched.max_num_batched_tokens}) must be >= max_model_len ({self.max_model_len})")
        torch.manual_seed(config.seed)
        if self.device.type == "cuda" and config.tensor_parallel_size * config.pipeline_parallel_size > 1:
            self.device = torch.device("cuda", 0)  # rank 0's
        # ranks 1.. of a tensor/pipeline-parallel group, loading meanwhile (None: this process alone)
        self.peers = start_group(config, self.model_path, hf_config, self.max_model_len, self.device, self.dtype)
        place = self.peers.placements[0] if self.peers else None
        # pipeline parallelism: this rank's stage (its layers, and its links to the others)
        self.pipeline = Pipeline(place, self.peers, hf_config["num_hidden_layers"]) if place and place.pp > 1 else None
        self.model = loader.build_model(cls, hf_config, self.model_path, self.max_model_len, self.device, self.dtype,
                                        config.load_format, place and place.shard, self.peers and self.peers.all_reduce,
                                        self.pipeline and self.pipeline.layers)
        if self.peers:
            self.peers.wait_ready()
        adapters = [self._load_adapter(name, path) for name, path in config.lora_modules.items()]  # before KV sizing
        self.tokenizer = None if config.skip_tokenizer_init else load_tokenizer(config.tokenizer or self.model_path)
        self.eos_token_ids = eos_token_ids(self.model_path, self.tokenizer, self.model.shape.vocab)
        self.grammars = GrammarBook(self.tokenizer, self.model.shape.vocab, self.eos_token_ids)  # structured outputs
        self.generation_defaults = self._generation_defaults()
        self.inputs = InputChecker(self.tokenizer, self.model.shape.vocab, self.max_model_len)
        cache = config.cache
        num_blocks = self._num_blocks()
        self.kv = KVCacheManager(num_blocks, cache.block_size, cache.enable_prefix_caching, cache.hash_seed)
        self.runner = ModelRunner(self.model, num_blocks, cache.block_size, self.dtype, self.device, self.pipeline)
        if self.peers:
            self.peers.call("runner", num_blocks, cache.block_size)
            self.runner.peers = self.peers
        self._set_loras(adapters)
        max_batch = min(config.scheduler.max_num_seqs, 512)
        # prompt lanes (and their mixed graphs) serve lof's paced prompt chunks only
        paced = config.scheduler.policy == "lof" and config.scheduler.num_scheduler_steps > 1
        lanes = prompt_lanes.MAX_LANES if paced else 0
        if self.device.type == "cuda":  # both prefill attention tile configs (past 1,024 tokens: the long one)
            longest = min(self.max_model_len, config.scheduler.max_num_batched_tokens)
            short = min(16, longest)  # positions past max_model_len are past the rope tables
            self.runner.compile_prompt_kernels((short, min(longest, 1040)) if longest > 1024 else (short,))
        if self.peers:
            pass  # eager steps only: no decode graphs (their all-reduces are not captured yet), no lookaheads
        elif self.device.type == "cuda" and not config.enforce_eager:
            self.runner.capture_graphs(max_batch, self.max_model_len, lanes)
        elif self.device.type == "cpu" and attention_backend(self.device) == "triton":
            # the Triton backend on CPUs (tests, through Triton's interpreter): the same static decode
            # buffers and multi-step path as CUDA graphs, run eagerly
            self.runner.capture_graphs(max_batch, self.max_model_len, lanes, use_graphs=False)
        lookahead = config.scheduler.num_scheduler_steps if self.runner.graphs is not None else 1
        self.scheduler = Scheduler(config.scheduler, self.kv, self.max_model_len, lookahead)
        self.layout = describe(hf_config, self.model, self.dtype, cache.block_size)
        # the KV cache as transfers and the KV store see it: every KV head, whichever ranks hold them
        self.wire_caches = (GroupCaches(self.runner.kv_caches, self.peers, self.layout.num_kv_heads) if self.peers
                            else LocalCaches(self.runner.kv_caches))
        self.model.pack_weights()  # after describe: the fingerprint samples the plain weights
        if self.peers:
            self.peers.call("pack")
        layerwise = stream_layerwise(self.device) and not self.peers  # the other ranks answer between passes only
        self.producer = (KVProducer(self.layout, cache.block_size, layerwise=layerwise)
                         if config.kv_role == "producer" else None)
        self.consumer = (KVConsumer(self.kv, self.wire_caches, self.layout, self.model.shape.vocab)
                         if config.kv_role == "consumer" else None)
        self.groups: dict[str, RequestGroup] = {}
        self.num_lookahead_steps = 0
        self.num_chained_lookaheads = 0
        self.num_lookahead_prompt_tokens = 0
        self._inflight: tuple | None = None  # (decode rows, Lookahead, GreedyTokens): a lookahead on the device
        self._detok: dict[Request, IncrementalDetokenizer] = {}
        self.stream_outputs = True  # False: `step` reports finished requests only (offline batches)

    def _generation_defaults(self) -> dict[str, Any]:
        return sampling_defaults(self.model_path, self.config.generation_config)

    def _num_blocks(self) -> int:
        cache = self.config.cache
        if cache.num_gpu_blocks is not None:
            return cache.num_gpu_blocks
        # rank 0 holds the most layers of any stage (the first stages get the extra ones): it sizes for all
        layers = len(self.pipeline.layers) if self.pipeline else self.model.shape.num_layers
        per_block = ModelRunner.kv_bytes_per_block(self.model, cache.block_size, self.dtype, layers)
        if self.device.type == "cuda":
            sched = self.config.scheduler
            args = (sched.max_num_batched_tokens, self.max_model_len, sched.max_num_seqs, cache.block_size)
            if self.peers:  # the pass all-reduces and sends between stages: every rank runs it
                self.peers.command("profile", *args)
            peak = ModelRunner.profile_activations(self.model, *args, self.dtype, self.device, self.pipeline)
            free, total = torch.cuda.mem_get_info(self.device)
            # the fraction is of the whole device, as in vLLM: weights, activations and cache included
            budget = total * cache.gpu_memory_utilization - (total - free) - peak
            budget /= self.peers.ranks_per_gpu if self.peers else 1
            if budget < per_block:
                raise ValueError(f"no room for the KV cache: weights and a {sched.max_num_batched_tokens}-token "
                                 f"step need {(total - free + peak) / 2**30:.1f} GiB of the "
                                 f"{total * cache.gpu_memory_utilization / 2**30:.1f} GiB allowed "
                                 "(raise gpu_memory_utilization or lower max_num_batched_tokens)")
        else:
            available = available_memory()
            # the CPU budget is the whole group's: each rank holds its share of the heads and layers
            budget = min(cache.cpu_kv_cache_gib * 2**30, available * cache.gpu_memory_utilization)
            budget /= self.peers.size if self.peers else 1
        # never more than every sequence at full length could use
        need = -(-self.max_model_len // cache.block_size)
        fits = int(budget // per_block)
        if fits < need:  # as vLLM: refuse at start-up, not when a long request outgrows the cache
            where = ("raise gpu_memory_utilization" if self.device.type == "cuda"
                     else "raise the CPU KV budget (cpu_kv_cache_gib, --kv-cache-gib)")
            raise ValueError(f"the KV cache holds {fits * cache.block_size} tokens, less than max_model_len "
                             f"({self.max_model_len}): {where}, or lower max_model_len")
        return min(fits, self.config.scheduler.max_num_seqs * need + 1)

    # ---- requests in ------------------------------------------------------------------------

    def default_sampling_params(self) -> SamplingParams:
        return SamplingParams(**self.generation_defaults)

    def process_prompt(self, prompt: str | list[int] | dict) -> tuple[str | None, list[int]]:
        return self.inputs.prompt(prompt)

    def check_params(self, params: SamplingParams) -> None:
        self.inputs.params(params)
        self.check_lora(params.lora)

    def prepare_params(self, params: SamplingParams) -> SamplingParams:
        params = params.clone()
        # banned before min_tokens even with ignore_eos (as vLLM and transformers' min_new_tokens do)
        params._eos_token_ids = self.eos_token_ids
        words = []
        if (params.bad_words or params.stop) and self.tokenizer is None:  # stop strings match text
            raise ValueError(f"{'bad_words' if params.bad_words else 'stop'} needs a tokenizer "
                             "(this engine has skip_tokenizer_init)")
        for word in params.bad_words:
            for variant in (word, " " + word.lstrip()):
                ids = self.tokenizer.encode(variant, add_special_tokens=False)
                if ids and ids not in words:
                    words.append(ids)
        params._bad_words_token_ids = words
        return params

    def _new_group(self, request_id: str, prompt: str | list[int] | dict, params: SamplingParams | None,
                   priority: int, arrival_time: float | None, resume_token_ids: list[int] = (),
                   seed_index: int = 0) -> RequestGroup:
        """A checked request group, registered but not yet scheduled. `resume_token_ids`: output a
        worker that failed streamed already; this sequence continues after them."""
        if request_id in self.groups:
            raise ValueError(f"request_id {request_id!r} is already in use")
        text, ids = self.process_prompt(prompt)
        params = params or self.default_sampling_params()
        self.check_params(params)
        params = self.prepare_params(params)
        if params.max_tokens is None:
            params.max_tokens = self.max_model_len - len(ids)
        if resume_token_ids:
            if params.best_of != 1:
                raise ValueError("only a single sequence (n = best_of = 1) can be resumed")
            if len(resume_token_ids) >= params.max_tokens or len(ids) + len(resume_token_ids) >= self.max_model_len:
                raise ValueError("nothing left to generate after the resumed tokens")
        group = RequestGroup.create(request_id, text, ids, params, arrival_time or time.monotonic(), priority,
                                    seed_index)
        compiled = self.grammars.compile(params.structured_outputs)  # a cache hit once the server checked it
        if compiled is not None:
            for seq in group.seqs:
                seq.grammar = self.grammars.matcher(compiled, params.structured_outputs)
            for tok in resume_token_ids:  # checked before the group is registered: a refusal leaves nothing
                if not group.seqs[0].grammar.accept_token(tok):
                    raise ValueError(f"resume token {tok} breaks the request's structured_outputs")
            if group.seqs[0].grammar.is_terminated():
                raise ValueError("nothing left to generate: the resumed tokens complete the structured_outputs")
        if params.prompt_logprobs is not None:
            group.prompt_logprobs = [None]
        self.groups[request_id] = group
        for seq in group.seqs:
            self._detok[seq] = (NoDetokenizer() if self.tokenizer is None else
                                IncrementalDetokenizer(self.tokenizer, ids, params.skip_special_tokens))
        seq = group.seqs[0]
        for tok in resume_token_ids:
            seq.append_token(tok)
            self._detok[seq].add(tok)
            if seq.logprobs is not None:
                seq.logprobs.append({})
        return group

    def add_request(self, request_id: str, prompt: str | list[int] | dict, params: SamplingParams | None = None,
                    priority: int = 0, arrival_time: float | None = None, *, resume_token_ids: list[int] = (),
                    seed_index: int = 0) -> None:
        group = self._new_group(request_id, prompt, params, priority, arrival_time, resume_token_ids, seed_index)
        self.scheduler.add(group.seqs[0])

    def abort_request(self, request_ids: str | list[str]) -> None:
        for rid in [request_ids] if isinstance(request_ids, str) else request_ids:
            group = self.groups.pop(rid, None)
            if group is not None:
                self._release(group)

    def has_unfinished_requests(self) -> bool:
        return bool(self.groups)

    def has_work(self) -> bool:
        """A step would do something (requests waiting for their KV alone give it nothing)."""
        return self.scheduler.has_unfinished() or bool(self.consumer and self.consumer.has_complete())

    # ---- the loop -------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """One schedule -> execute -> update pass; outputs of every group that progressed. With a lookahead
        in flight, the next step is planned on its optimistic outcome and launched before its tokens are
        read (lookaheads.py)."""
        if self.consumer is not None:
            admitted = self._admit_loaded()
            if admitted:  # first tokens that came with their KV go out now (a lookahead in flight stays so)
                return self._outputs(admitted)
        inflight, self._inflight = self._inflight, None
        if inflight is not None:
            self._apply(inflight)
        sched = self.scheduler.schedule()
        ahead = self._lookahead(sched) if sched.scheduled else None
        if ahead is not None:
            self._inflight = self._launch(sched, ahead, inflight)
        touched: dict[str, RequestGroup] = {}
        if inflight is not None:
            self._resolve(inflight, touched)
            if ahead is None:  # an ordinary step planned on the lookahead's outcome: not for rows that stopped
                sched.scheduled = [s for s in sched.scheduled if not s.request.finished]
        if ahead is None and sched.scheduled:
            self._execute(sched, touched)
        elif ahead is None and inflight is None:
            leased = self.consumer is not None and bool(self.consumer.leases)  # blocks come back later
            if self.scheduler.waiting and not self.scheduler.running and not leased:
                req = self.scheduler.waiting[0]
                raise RuntimeError(f"request {req.seq_id} ({req.num_tokens} tokens) cannot fit in the "
                                   f"KV cache ({self.kv.pool.num_blocks} blocks of {self.kv.block_size})")
        return self._outputs(touched)

    def _execute(self, sched: SchedulerOutput, touched: dict[str, RequestGroup]) -> None:
        """An ordinary step: one forward pass over the scheduled tokens, then each sample applied."""
        tables = self.kv.tables  # read-only here: the runner and the producer only read them
        saving = self.producer is not None and self.producer.plan(sched.scheduled, tables)
        layerwise = saving and self.producer.layerwise
        result = self.runner.execute(sched, tables, self.producer.save_layer if layerwise else None)
        if saving and not layerwise:
            self.producer.save_step(self.wire_caches)
        now = time.monotonic()
        starts = {s.request: s.request.num_computed_tokens for s in sched.scheduled}
        for s in sched.scheduled:
            s.request.num_computed_tokens += s.num_new_tokens
        if self.producer is not None:
            self.producer.step_done({req: smps[0] for req, smps in result.samples.items() if req.kv_only})
            for s in sched.scheduled:
                req = s.request
                if req.kv_only and req.num_computed_tokens >= req.num_tokens:
                    self.scheduler.finish(req, "prefilled")
                    touched[req.group.request_id] = req.group
        for req, entries in result.prompt_logprobs.items():
            # entries[0] is prompt position starts[req] + 1; positions below len(...) are recorded
            # already (a preempted request recomputes its prompt)
            done = len(req.group.prompt_logprobs) - (starts[req] + 1)
            req.group.prompt_logprobs.extend(entries[max(done, 0):])
        for req, samples in result.samples.items():
            if req.kv_only:
                continue  # its first token went with its KV
            forks = req.pending_forks
            req.group.forked = True
            for child, smp in zip(forks, samples[1:]):
                self.kv.fork(req, child)
                child.num_computed_tokens = req.num_computed_tokens
                self.scheduler.add_running(child)
                self._update(child, smp, now)
            self._update(req, samples[0], now)
            touched[req.group.request_id] = req.group

    def _outputs(self, touched: dict[str, RequestGroup]) -> list[RequestOutput]:
        outputs = [self._output(g) for g in touched.values() if self.stream_outputs or g.finished]
        for out in outputs:
            if out.finished:
                self._release(self.groups.pop(out.request_id))
        return outputs

    def _update(self, req: Request, smp: Sample, now: float) -> None:
        self._append(req, (smp.token_id,), (smp.logprob,), (smp.top,), now)

    def _append(self, req: Request, tokens, logprobs, tops, now: float) -> int:
        """Appends tokens in order, as that many steps would, until the request stops (a stop token or
        string, its length limit); returns how many it took. `tops`: each token's top logprobs, or None."""
        p = req.params
        detok = self._detok[req]
        eos, stop_ids = () if p.ignore_eos else p._eos_token_ids, p.stop_token_ids
        if req.first_token_time is None and tokens:
            req.first_token_time = now
        taken = 0
        for tok, lp in zip(tokens, logprobs):
            if req.grammar is not None and not req.grammar.accept_token(tok):
                # the sampler masks what the matcher refuses: only an all-masked row gets here, i.e. min_tokens
                # banned the EOS a complete grammar needs (its output is whole: a stop, not an abort)
                self.scheduler.finish(req, "stop" if req.grammar.is_completed() else "abort")
                break
            req.append_token(tok)
            if lp is not None:
                req.cumulative_logprob += lp
            if req.logprobs is not None:
                req.logprobs.append((tops[taken] if tops else None) or {})
            taken += 1
            n_out = len(req.output_token_ids)
            may_stop = n_out >= p.min_tokens
            if (may_stop and tok in eos) or (req.grammar is not None and req.grammar.is_terminated()):
                self.scheduler.finish(req, "stop")  # a completed grammar ends on EOS even under ignore_eos
                break
            if may_stop and tok in stop_ids:
                if p.include_stop_str_in_output:
                    detok.add(tok)
                self.scheduler.finish(req, "stop", tok)
                break
            delta = detok.add(tok)
            if may_stop and p.stop and delta:
                hit = find_stop(detok.text, len(delta), p.stop)
                if hit is not None:
                    i, stop = hit
                    detok.text = detok.text[: i + len(stop) if p.include_stop_str_in_output else i]
                    self.scheduler.finish(req, "stop", stop)
                    break
            if n_out >= p.max_tokens or req.num_tokens >= self.max_model_len:
                self.scheduler.finish(req, "length")
                break
        return taken

    def _output(self, group: RequestGroup) -> RequestOutput:
        seqs = group.seqs if group.forked else group.seqs[:1]
        if group.finished and group.params.best_of > group.params.n:
            seqs = sorted(seqs, key=lambda s: s.cumulative_logprob, reverse=True)[: group.params.n]
        outs = [CompletionOutput(
            index=i, text=self._detok[s].text, token_ids=list(s.output_token_ids),
            cumulative_logprob=s.cumulative_logprob if group.params.wants_logprob else None, logprobs=s.logprobs,
            finish_reason=s.finish_reason, stop_reason=s.stop_reason) for i, s in enumerate(seqs)]
        first = group.seqs[0]
        metrics = RequestMetrics(
            arrival_time=group.arrival_time, first_scheduled_time=first.first_scheduled_time,
            first_token_time=first.first_token_time, last_token_time=time.monotonic(),
            finished_time=time.monotonic() if group.finished else None,
            num_cached_tokens=max(first.num_cached_tokens, 0),
            num_preemptions=sum(s.num_preemptions for s in group.seqs))
        return RequestOutput(group.request_id, group.prompt, group.prompt_token_ids, group.prompt_logprobs,
                             outs, group.finished, metrics, max(first.num_cached_tokens, 0))

    def _release(self, group: RequestGroup) -> None:
        for seq in group.seqs:
            if self.consumer is not None:
                self.consumer.release(seq)  # before its blocks are freed: no transfer writes after
            if self.producer is not None:
                self.producer.detach(seq)
            self.scheduler.finish(seq, "abort")  # no-op for finished ones; frees never-forked ones
            self._detok.pop(seq, None)

    def close(self) -> None:
        """Stops the tensor-parallel ranks' processes (also done when the engine is garbage collected)."""
        if self.peers:
            self.peers.close()

    def stats(self) -> EngineStats:
        return EngineStats(
            # sequences, as in running: a waiting request's n > 1 samples count apiece (vLLM's child requests)
            num_running=len(self.scheduler.running), num_waiting=sum(r.seats for r in self.scheduler.waiting),
            kv_usage=self.kv.pool.usage(), num_free_blocks=self.kv.pool.num_free,
            num_blocks=self.kv.pool.num_blocks, prefix_cache_queries=self.kv.prefix_queries,
            prefix_cache_hits=self.kv.prefix_hits, num_preemptions=self.scheduler.num_preemptions,
            num_lookahead_steps=self.num_lookahead_steps, num_chained_lookaheads=self.num_chained_lookaheads,
            num_lookahead_prompt_tokens=self.num_lookahead_prompt_tokens,
            **self._lora_stats())
