"""Executes one scheduled step: builds the flat token batch and attention metadata, runs the model,
and samples. Owns the model and the KV cache tensors."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from tandem.engine.attention import AttentionBatch, DecodeGroup, PrefillSeq
from tandem.engine.models.llama import LlamaForCausalLM
from tandem.engine.request import Request
from tandem.engine.sampler import Sample, SampleRow, prompt_logprobs, sample
from tandem.engine.scheduler import SchedulerOutput
from tandem.outputs import Logprob

DECODE_GROUP_SIZE = 16


@dataclass
class StepResult:
    samples: dict[Request, list[Sample]] = field(default_factory=dict)  # first, then forks
    prompt_logprobs: dict[Request, list[dict[int, Logprob]]] = field(default_factory=dict)


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        self.model = model
        self.block_size = block_size
        self.device = device
        s = model.shape
        self.kv_caches = [
            torch.zeros(2, num_blocks, block_size, s.num_kv_heads, s.head_dim, dtype=dtype, device=device)
            for _ in range(s.num_layers)]
        self.scale = s.head_dim ** -0.5

    @staticmethod
    def kv_bytes_per_block(model: LlamaForCausalLM, block_size: int, dtype: torch.dtype) -> int:
        s = model.shape
        return 2 * s.num_layers * block_size * s.num_kv_heads * s.head_dim * dtype.itemsize

    def _copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        if not copies:
            return
        src = torch.tensor([c[0] for c in copies], device=self.device)
        dst = torch.tensor([c[1] for c in copies], device=self.device)
        for cache in self.kv_caches:
            cache[:, dst] = cache[:, src]

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput, block_tables: dict[str, list[int]],
                on_layer_written: Callable[[int, torch.Tensor], None] | None = None) -> StepResult:
        self._copy_blocks(sched.block_copies)
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        decode_rows, decode_tables, decode_lens = [], [], []
        prefills: list[PrefillSeq] = []
        sample_rows: list[tuple[Request, int]] = []
        plp_rows: list[tuple[Request, int, int]] = []  # (request, first row, count)
        # Prompt chunks first, then single-token rows by context length: each decode group is then
        # a contiguous slice of the batch (views, no gathers or scatters of q and out).
        order = sorted(sched.scheduled, key=lambda s: (s.num_new_tokens == 1, s.request.num_computed_tokens))
        for s in order:
            r, n = s.request, s.num_new_tokens
            start, ctx = r.num_computed_tokens, r.num_computed_tokens + n
            table = block_tables[r.seq_id]
            row = len(input_ids)
            input_ids += r.all_token_ids[start:ctx]
            positions += range(start, ctx)
            slots += [table[p // bs] * bs + p % bs for p in range(start, ctx)]
            if n == 1:
                decode_rows.append(row)
                decode_tables.append(table[: -(-ctx // bs)])
                decode_lens.append(ctx)
            else:
                prefills.append(PrefillSeq(row, n, ctx, torch.tensor(table[: -(-ctx // bs)])))
            if r.params.prompt_logprobs is not None and start < r.num_prompt_tokens - 1:
                count = min(ctx, r.num_prompt_tokens - 1) - start
                plp_rows.append((r, row, count))
            if s.samples and not r.kv_only:
                sample_rows.append((r, row + n - 1))
        attn = AttentionBatch(
            kv_caches=self.kv_caches,
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=self.device),
            decodes=self._decode_groups(decode_rows, decode_tables, decode_lens),
            prefills=prefills, scale=self.scale, sliding_window=self.model.shape.sliding_window,
            on_layer_written=on_layer_written)
        hidden = self.model(torch.tensor(input_ids, device=self.device),
                            torch.tensor(positions, device=self.device), attn)
        result = StepResult()
        for r, row, count in plp_rows:
            logits = self.model.compute_logits(hidden[row:row + count])
            nxt = r.prompt_token_ids[r.num_computed_tokens + 1: r.num_computed_tokens + 1 + count]
            result.prompt_logprobs[r] = prompt_logprobs(logits, nxt, r.params.prompt_logprobs)
        if sample_rows:
            rows = torch.tensor([row for _, row in sample_rows])
            self._sample([r for r, _ in sample_rows], hidden[rows], result)
        return result

    @staticmethod
    def _decode_groups(rows: list[int], tables: list[list[int]], lens: list[int]) -> list[DecodeGroup]:
        """Consecutive decode rows (sorted by context length) cut into groups, so that padding each
        row to its group's longest context wastes little attention work."""
        groups = []
        for start in range(0, len(rows), DECODE_GROUP_SIZE):
            members = range(start, min(start + DECODE_GROUP_SIZE, len(rows)))
            width = max(len(tables[i]) for i in members)
            padded = torch.zeros(len(members), width, dtype=torch.long)
            for j, i in enumerate(members):
                padded[j, : len(tables[i])] = torch.tensor(tables[i])
            groups.append(DecodeGroup(slice(rows[members[0]], rows[members[-1]] + 1), padded,
                                      torch.tensor([lens[i] for i in members])))
        return groups

    def _sample(self, requests: list[Request], hidden: torch.Tensor, result: StepResult) -> None:
        logits = self.model.compute_logits(hidden)
        rows: list[SampleRow] = []
        owners: list[Request] = []
        index: list[int] = []
        for i, r in enumerate(requests):
            for seq in [r] + r.pending_forks:
                rows.append(SampleRow(seq.params, seq.prompt_token_ids, seq.output_token_ids, seq.seed))
                owners.append(r)
                index.append(i)
        samples = sample(logits[torch.tensor(index)], rows)
        for owner, smp in zip(owners, samples):
            result.samples.setdefault(owner, []).append(smp)
