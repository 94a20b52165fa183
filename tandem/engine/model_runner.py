"""Executes one scheduled step: builds the flat token batch and attention metadata, runs the model,
and samples. Owns the model and the KV cache tensors."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import torch

from tandem.engine import prompt_lanes
from tandem.engine.attention import SeqSlice, build_attention, host_longs, whole_prompts
from tandem.engine.lora import LoRABatch, LoRALayers
from tandem.engine.models.llama import LlamaForCausalLM
from tandem.engine.multi_step import Lookahead
from tandem.engine.request import Request
from tandem.engine.sampler import Sample, prompt_logprobs, sample, wants_float_logits
from tandem.engine.scheduler import SchedulerOutput
from tandem.outputs import Logprob

if TYPE_CHECKING:
    from tandem.engine.cuda_graphs import GreedyTokens
    from tandem.engine.parallel_group import ParallelGroup
    from tandem.engine.pipeline import Pipeline


@dataclass
class StepResult:
    samples: dict[Request, list[Sample]] = field(default_factory=dict)  # first, then forks
    prompt_logprobs: dict[Request, list[dict[int, Logprob]]] = field(default_factory=dict)


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device, pipeline: "Pipeline | None" = None) -> None:
        self.model = model
        self.block_size = block_size
        self.device = device
        self.pipeline = pipeline  # pipeline parallelism: this rank's stage, its layers and links (pipeline.py)
        s = model.shape
        self.kv_layers = pipeline.layers if pipeline else range(s.num_layers)  # the layers whose KV lives here
        # another stage's layers get a one-block stand-in: never read or written here, and it keeps every
        # layer's cache at its index
        self.kv_caches = [
            torch.zeros(2, num_blocks if i in self.kv_layers else 1, block_size, s.num_kv_heads, s.head_dim,
                        dtype=dtype, device=device)
            for i in range(s.num_layers)]
        self.scale = s.head_dim ** -0.5
        self.graphs = None
        self.loras: LoRALayers | None = None  # the engine's LoRA adapters, told each step's rows under them
        self.peers: "ParallelGroup | None" = None  # a parallel group's other ranks, told each pass's inputs first

    def capture_graphs(self, max_batch: int, max_model_len: int, max_lanes: int = 0, use_graphs: bool = True) -> None:
        from tandem.engine.cuda_graphs import DecodeGraphs

        self.graphs = DecodeGraphs(self.model, self.kv_caches, self.scale, max_batch, max_model_len, self.block_size,
                                   max_lanes, use_graphs)
        self.graphs.capture()
        if use_graphs:  # CUDA: the lookaheads' greedy tail compiled now, not in a request's step
            from tandem.kernels.greedy import compile_variants

            with torch.inference_mode():
                hidden = torch.zeros(3, self.model.shape.hidden, dtype=self.kv_caches[0].dtype, device=self.device)
                compile_variants(self._raw_logits(hidden), self.block_size)

    @torch.inference_mode()
    def compile_prompt_kernels(self, lengths: tuple[int, ...]) -> None:
        """One prompt chunk of each length through the model, writing nothing (slots -1; its keys read from
        block 0): Triton compiles a prompt step's kernels, both of prefill attention's tile configs among
        them (chunks up to 1,024 tokens, and longer), now rather than in a first request's step."""
        if self.peers:
            self.peers.command("compile", lengths)
        for n in lengths:
            seqs = [SeqSlice(0, n, n, [0] * -(-n // self.block_size))]
            attn = build_attention(self.kv_caches, seqs, [-1] * n, self.scale, self.model.shape.sliding_window)
            self._run_model(torch.zeros(n, dtype=torch.long, device=self.device), torch.arange(n, device=self.device),
                            attn)

    @staticmethod
    @torch.inference_mode()
    def profile_activations(model: LlamaForCausalLM, num_tokens: int, max_model_len: int, num_logit_rows: int,
                            block_size: int, dtype: torch.dtype, device: torch.device,
                            pipeline: "Pipeline | None" = None) -> int:
        """Peak bytes a step of `num_tokens` prompt tokens allocates beyond what is live before it (CUDA),
        measured on a throwaway cache just large enough for it."""
        lens = [min(max_model_len, num_tokens - i) for i in range(0, num_tokens, max_model_len)]
        runner = ModelRunner(model, sum(-(-n // block_size) for n in lens) + 1, block_size, dtype, device, pipeline)
        seqs, slots = whole_prompts(lens, block_size)
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        ids = torch.randint(0, model.shape.vocab, (num_tokens,), device=device)
        positions = torch.cat([torch.arange(n, device=device) for n in lens])
        attn = build_attention(runner.kv_caches, seqs, slots, runner.scale, model.shape.sliding_window)
        hidden = runner._run_model(ids, positions, attn)
        if hidden is not None:  # rank 0 (other pipeline ranks compute no logits)
            model.compute_logits(hidden[:num_logit_rows]).softmax(dim=-1)
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        del runner, hidden, attn
        torch.cuda.empty_cache()
        return peak

    @staticmethod
    def kv_bytes_per_block(model: LlamaForCausalLM, block_size: int, dtype: torch.dtype, num_layers: int) -> int:
        """Bytes of one block over `num_layers` layers (those this rank holds) of this rank's KV heads."""
        s = model.shape
        return 2 * num_layers * block_size * s.num_kv_heads * s.head_dim * dtype.itemsize

    def _copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        if not copies:
            return
        if self.peers:
            self.peers.command("copy", copies)
        src = torch.tensor([c[0] for c in copies], device=self.device)
        dst = torch.tensor([c[1] for c in copies], device=self.device)
        for i in self.kv_layers:
            self.kv_caches[i][:, dst] = self.kv_caches[i][:, src]

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput, block_tables: dict[str, list[int]],
                on_layer_written: Callable[[int, torch.Tensor], None] | None = None) -> StepResult:
        self._copy_blocks(sched.block_copies)
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        seqs: list[SeqSlice] = []
        sample_rows: list[tuple[Request, int]] = []
        lora_rows: dict[str, list[int]] = {}  # adapter -> its rows
        plp_rows: list[tuple[Request, int, int]] = []  # (request, first row, count)
        # Prompt chunks first, then single-token rows by context length: each backend then finds its
        # kinds of rows as contiguous slices of the batch (views, no gathers or scatters of q and out).
        # This loop runs for every request every step: it is the host's hot path.
        order = [s for s in sched.scheduled if s.num_new_tokens > 1]
        order += sorted((s for s in sched.scheduled if s.num_new_tokens == 1),
                        key=lambda s: s.request.num_computed_tokens)
        for s in order:
            r, n = s.request, s.num_new_tokens
            start = r.num_computed_tokens
            ctx = start + n
            table = block_tables[r.seq_id]
            row = len(input_ids)
            if n == 1:
                input_ids.append(r.all_token_ids[start])
                positions.append(start)
                slots.append(table[start // bs] * bs + start % bs)
            else:
                input_ids += r.all_token_ids[start:ctx]
                positions += range(start, ctx)
                slots += [table[p // bs] * bs + p % bs for p in range(start, ctx)]
            used = -(-ctx // bs)
            seqs.append(SeqSlice(row, n, ctx, table if len(table) == used else table[:used]))
            if r.params.lora is not None:
                lora_rows.setdefault(r.params.lora, []).extend(range(row, row + n))
            if r.params.prompt_logprobs is not None and start < r.num_prompt_tokens - 1:
                count = min(ctx, r.num_prompt_tokens - 1) - start
                plp_rows.append((r, row, count))
            if s.samples and (not r.kv_only or r.sample_first_token):
                sample_rows.append((r, row + n - 1))
        # prompt logprobs read every prompt row; otherwise only the sampled rows' hidden states are made
        # (rows under LoRA adapters keep theirs: their groups index the whole batch)
        keep = (None if plp_rows or lora_rows or len(sample_rows) == len(input_ids)
                else [row for _, row in sample_rows])
        lora_groups = [(self.loras.index[name], rows) for name, rows in lora_rows.items()]
        hidden = self._forward(input_ids, positions, slots, seqs, on_layer_written, keep, lora_groups)
        result = StepResult()
        for r, row, count in plp_rows:
            logits = self.model.compute_logits(hidden[row:row + count])
            nxt = r.prompt_token_ids[r.num_computed_tokens + 1: r.num_computed_tokens + 1 + count]
            result.prompt_logprobs[r] = prompt_logprobs(logits, nxt, r.params.prompt_logprobs)
        if sample_rows:
            if keep is None and len(sample_rows) < len(input_ids):
                hidden = hidden[torch.tensor([row for _, row in sample_rows])]
            self._sample([r for r, _ in sample_rows], hidden, result)
        return result

    @torch.inference_mode()
    def launch_greedy_steps(self, sched: SchedulerOutput, block_tables: dict[str, list[int]], ahead: Lookahead,
                            feed: tuple | None = None) -> "GreedyTokens":
        """`ahead.steps` greedy decode steps of the decode rows `sched` (and `ahead.prompt`'s lanes) on the
        device, the tables holding slots for all of them. `feed`: (the previous lookahead's GreedyTokens,
        rows here, its rows there): those rows' first inputs are its last tokens, still on the device.
        Returns at once; `result()` gives each decode row's tokens."""
        bs = self.block_size
        seqs: list[SeqSlice] = []
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        for row, s in enumerate(sched.scheduled):
            r = s.request
            pos = r.num_computed_tokens
            table = block_tables[r.seq_id]
            input_ids.append(r.all_token_ids[pos])
            positions.append(pos)
            slots.append(table[pos // bs] * bs + pos % bs)
            seqs.append(SeqSlice(row, 1, pos + 1, table))
        lanes = prompt_lanes.pack(ahead.prompt, ahead.steps, block_tables, bs, len(seqs)) if ahead.prompt else None
        return self.graphs.run_greedy_steps(input_ids, positions, slots, seqs, ahead.steps, bs,
                                            self._raw_logits, ahead.ban_ids, ahead.ban_steps, lanes, feed)

    def _raw_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.compute_logits(hidden, upcast=False)

    def _forward(self, input_ids: list[int], positions: list[int], slots: list[int], seqs: list[SeqSlice],
                 on_layer_written, keep: list[int] | None = None,
                 lora_groups: list[tuple[int, list[int]]] = ()) -> torch.Tensor:
        """The final hidden states of every row, or of the rows in `keep` (in its order). `lora_groups`: (adapter
        index, its rows) for the rows that run under adapters."""
        if self.graphs is not None and on_layer_written is None and not lora_groups:
            hidden = self.graphs.run(input_ids, positions, slots, seqs)
            if hidden is not None:
                return hidden if keep is None else hidden[self._device_tensor(keep)]
        if self.peers:
            self.peers.command("forward", input_ids, positions, slots, seqs, keep, lora_groups)
        return self.forward_eager(input_ids, positions, slots, seqs, keep, lora_groups, on_layer_written)

    def forward_eager(self, input_ids: list[int], positions: list[int], slots: list[int], seqs: list[SeqSlice],
                      keep: list[int] | None = None, lora_groups: list[tuple[int, list[int]]] = (),
                      on_layer_written=None) -> torch.Tensor:
        """One forward pass as every tensor-parallel rank runs it (rank 0 from `_forward`, the others when told)."""
        if lora_groups:
            self.loras.batch = LoRABatch([(i, self._device_tensor(rows)) for i, rows in lora_groups])
        try:
            attn = build_attention(self.kv_caches, seqs, slots, self.scale, self.model.shape.sliding_window,
                                   on_layer_written)
            return self._run_model(self._device_tensor(input_ids), self._device_tensor(positions), attn,
                                   None if keep is None else self._device_tensor(keep))
        finally:
            if lora_groups:
                self.loras.batch = LoRABatch()

    def _run_model(self, input_ids: torch.Tensor, positions: torch.Tensor, attn, keep: torch.Tensor | None = None):
        """The model's pass, or this rank's stage of it (rank 0 gets the hidden states; other stages None)."""
        if self.pipeline is None:
            return self.model(input_ids, positions, attn, keep)
        return self.pipeline.forward(self.model, input_ids, positions, attn, keep)

    def _device_tensor(self, values: list[int]) -> torch.Tensor:
        t = host_longs(values)
        return t.pin_memory().to(self.device, non_blocking=True) if self.device.type == "cuda" else t

    def _sample(self, requests: list[Request], hidden: torch.Tensor, result: StepResult) -> None:
        logits = self.model.compute_logits(hidden, upcast=wants_float_logits(requests))
        rows: list[Request] = requests  # a Request is a SampleRow; forks add rows after their parent
        owners = requests
        if any(r.pending_forks for r in requests):
            rows, owners, index = [], [], []
            for i, r in enumerate(requests):
                for seq in [r] + r.pending_forks:
                    rows.append(seq)
                    owners.append(r)
                    index.append(i)
            logits = logits[torch.tensor(index, device=logits.device)]
        samples = sample(logits, rows)
        for owner, smp in zip(owners, samples):
            result.samples.setdefault(owner, []).append(smp)
