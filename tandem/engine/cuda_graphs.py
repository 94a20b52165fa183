"""CUDA graphs of the decode-only forward pass at bucketed batch sizes.

A step whose rows are all single tokens (the steady state of generation) replays the graph of the
smallest bucket that holds it, after copying its inputs into the graph's static tensors; the rows
past the batch are padding: slot -1 (the cache write skips it) and context length 0 (attention
reads nothing). Steps with a prompt chunk, KV saving, or more rows than the largest bucket run eager,
except in a lookahead (multi_step.py), where prompt lanes follow the decode rows: the buckets go
`prompt_lanes` rows past the largest batch for them.

With `use_graphs=False` nothing is captured and a "replay" runs the model eagerly on the same static
tensors: CPUs run the Triton backend's decode path this way (through Triton's interpreter) in tests.
"""
from __future__ import annotations

import bisect
import logging
from dataclasses import dataclass

import numpy as np
import torch

from tandem.engine import ops
from tandem.engine.attention import SeqSlice
from tandem.engine.attention_triton import DecodeMeta, TritonAttention

log = logging.getLogger("tandem.engine")


def bucket_sizes(max_batch: int) -> list[int]:
    sizes = [b for b in (1, 2, 4, 8) if b < max_batch] + list(range(16, max_batch, 16))
    return sizes + [max_batch]


class DecodeGraphs:
    def __init__(self, model, kv_caches: list[torch.Tensor], scale: float, max_batch: int, max_model_len: int,
                 block_size: int, prompt_lanes: int = 0, use_graphs: bool = True) -> None:
        self.model = model
        self.use_graphs = use_graphs
        self.prompt_lanes = prompt_lanes
        self.buckets = bucket_sizes(max_batch + prompt_lanes)
        max_batch = self.buckets[-1]
        self.max_model_len = max_model_len
        device = kv_caches[0].device
        max_blocks = -(-max_model_len // block_size)
        # host staging (pinned) and device copies of every input, sized for the largest bucket
        self.host = {"input_ids": np.zeros(max_batch, np.int64), "positions": np.zeros(max_batch, np.int64),
                     "slots": np.full(max_batch, -1, np.int64), "context_lens": np.zeros(max_batch, np.int32),
                     "block_tables": np.zeros((max_batch, max_blocks), np.int32)}
        pin = device.type == "cuda"
        self.pinned = {k: torch.from_numpy(v).pin_memory() if pin else torch.from_numpy(v) for k, v in self.host.items()}
        self.host = {k: v.numpy() for k, v in self.pinned.items()}  # write straight into pinned memory
        self.dev = {k: v.to(device, copy=True) for k, v in self.pinned.items()}
        self.attn = {b: TritonAttention(kv_caches, self.dev["slots"][:b], scale, model.shape.sliding_window,
                                        decode=DecodeMeta(0, self.dev["block_tables"][:b],
                                                          self.dev["context_lens"][:b], max_model_len))
                     for b in self.buckets}
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph | None, torch.Tensor | None]] = {}
        self._uploaded: torch.cuda.Event | None = None
        self._bucket = self._rows = 0  # the last lookahead's bucket and rows (chained lookaheads continue it)

    @torch.inference_mode()
    def capture(self) -> None:
        """Largest bucket first, so the smaller ones reuse its memory from the shared pool."""
        if not self.use_graphs:
            self.graphs = {b: (None, None) for b in self.buckets}
            return
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for b in reversed(self.buckets):
                args = (self.dev["input_ids"][:b], self.dev["positions"][:b], self.attn[b])
                self.model(*args)  # compiles the kernels and sets up cuBLAS outside the capture
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=stream):
                    hidden = self.model(*args)
                self.graphs[b] = (graph, hidden)
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        log.info("captured decode CUDA graphs for batch sizes %s", self.buckets)

    def _stage(self, input_ids: list[int], positions: list[int], slots: list[int], seqs: list[SeqSlice],
               lane_tables: list[list[int]] = ()) -> int | None:
        """Copies a decode-only step's inputs into the graphs' static tensors, and the prompt lanes' tables
        after its rows (their other inputs change every step); returns the bucket."""
        n = len(seqs)
        rows = n + len(lane_tables)
        if rows > self.buckets[-1] or len(input_ids) != n or not self.graphs:
            return None
        b = self.buckets[bisect.bisect_left(self.buckets, rows)]
        self._host_free()
        h = self.host
        h["input_ids"][:n] = input_ids
        h["positions"][:n] = positions
        h["slots"][:n] = slots
        h["slots"][n:b] = -1
        h["context_lens"][:n] = [s.context_len for s in seqs]
        h["context_lens"][n:b] = 0
        self._fill_tables([s.block_table for s in seqs] + list(lane_tables))
        self._upload(("input_ids", "positions", "slots", "context_lens", "block_tables"), b)
        return b

    def _fill_tables(self, tables: list[list[int]]) -> None:
        host = self.host["block_tables"]
        for i, t in enumerate(tables):
            host[i, :len(t)] = t

    def _upload(self, keys: tuple[str, ...], b: int) -> None:
        for key in keys:
            self.dev[key][:b].copy_(self.pinned[key][:b], non_blocking=True)
        if self.dev["input_ids"].is_cuda:
            self._uploaded = torch.cuda.Event()
            self._uploaded.record()

    def _host_free(self) -> None:
        """The pinned staging buffers may be rewritten: their last upload has run. With chained
        lookaheads the host stages the next one while the device may not have reached the last copy."""
        if self._uploaded is not None:
            self._uploaded.synchronize()
            self._uploaded = None

    def run(self, input_ids: list[int], positions: list[int], slots: list[int],
            seqs: list[SeqSlice]) -> torch.Tensor | None:
        """The hidden states of a decode-only step, or None when this step cannot replay a graph."""
        b = self._stage(input_ids, positions, slots, seqs)
        if b is None:
            return None
        return self._replay(b)[:len(seqs)]

    def _replay(self, b: int) -> torch.Tensor:
        """The bucket's forward pass on the static inputs: its graph, or the model run eagerly."""
        graph, hidden = self.graphs[b]
        if graph is None:
            return self.model(self.dev["input_ids"][:b], self.dev["positions"][:b], self.attn[b])
        graph.replay()
        return hidden

    def run_greedy_steps(self, input_ids: list[int], positions: list[int], slots: list[int], seqs: list[SeqSlice],
                         steps: int, block_size: int, logits_of, ban_ids: list[int],
                         ban_steps: list[int], lanes: "PromptLanes | None" = None) -> "GreedyTokens | None":
        """`steps` greedy decode steps with no host round trip: each step's argmax is the next step's
        input, positions, slots and context lengths advance on the device. The block tables must cover
        every position. Returns the tokens and their logprobs (raw distribution), on their way to the host.
        Row i cannot pick `ban_ids` in its first `ban_steps[i]` steps (min_tokens). `lanes`: prompt tokens
        computed alongside, rows after the decode rows."""
        b = self._stage(input_ids, positions, slots, seqs, lanes.tables if lanes else ())
        if b is None:
            return None
        self._bucket, self._rows = b, len(seqs)
        per_step = _to_device(lanes.inputs, self.dev["input_ids"].device) if lanes else None
        return self._greedy_loop(steps, block_size, logits_of, ban_ids, ban_steps, chained=False, lanes=per_step)

    def continue_greedy_steps(self, keep: list[int], seqs: list[SeqSlice], steps: int, block_size: int, logits_of,
                              ban_ids: list[int], ban_steps: list[int]) -> "GreedyTokens":
        """More greedy steps right after the last lookahead, for its rows `keep` (in order; `seqs` are
        theirs), whose next input, position and context length are on the device already. Only the
        block tables, grown to cover the new positions, go up again: the host need not have read the
        last lookahead's tokens, and nothing here waits for the device."""
        d = self.dev
        m = len(keep)
        self._host_free()
        if keep != list(range(self._rows)):  # rows left: compact the survivors to the front
            self.host["slots"][:m] = keep  # any pinned int64 buffer serves as the index's staging
            index = self.pinned["slots"][:m].to(d["slots"].device, non_blocking=True)
            for key in ("input_ids", "positions", "context_lens"):
                d[key][:m] = d[key][:self._rows].index_select(0, index)
            b = self.buckets[bisect.bisect_left(self.buckets, m)]
            d["context_lens"][m:b] = 0  # padding rows again: attention reads nothing, writes go nowhere
            d["slots"][m:b] = -1
            self._bucket, self._rows = b, m
        self._fill_tables([s.block_table for s in seqs])
        self._upload(("block_tables",), m)
        return self._greedy_loop(steps, block_size, logits_of, ban_ids, ban_steps, chained=True)

    def _greedy_loop(self, steps: int, block_size: int, logits_of, ban_ids: list[int], ban_steps: list[int],
                     chained: bool, lanes: torch.Tensor | None = None) -> "GreedyTokens":
        d, b, n = self.dev, self._bucket, self._rows
        device = d["input_ids"].device
        tokens = torch.empty(steps, n, dtype=torch.long, device=device)
        logprobs = torch.empty(steps, n, dtype=torch.float32, device=device)
        banned = ban_left = None
        if ban_ids:  # uploads from pinned memory: a plain one would wait for the device (chained lookaheads)
            banned = _to_device(ban_ids, device)
            ban_left = _to_device(ban_steps, device)
        ids, pos, ctx, slot = d["input_ids"][:n], d["positions"][:n], d["context_lens"][:n], d["slots"][:n]
        table = d["block_tables"][:n]
        if chained:  # its first slots come from its new tables; each step's advance writes the next ones
            slot.copy_(table.gather(1, (pos // block_size)[:, None])[:, 0].long() * block_size + pos % block_size)
        for k in range(steps):
            if lanes is not None:  # the prompt lanes' inputs of step k: [token, position, slot, context]
                for key, values in zip(("input_ids", "positions", "slots", "context_lens"), lanes[:, k]):
                    d[key][n:n + values.shape[0]].copy_(values)
            logits = logits_of(self._replay(b)[:n])
            # token and logprob of step k, then the rows' next inputs (a chained lookahead starts there)
            ops.greedy_advance(logits, tokens[k], logprobs[k], ids, pos, ctx, slot, table, block_size, banned,
                               ban_left, k)
        return GreedyTokens(tokens, logprobs)


def _to_device(values: "list[int] | np.ndarray", device: torch.device) -> torch.Tensor:
    t = torch.as_tensor(values, dtype=torch.long)
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t


@dataclass
class PromptLanes:
    """Prompt tokens computed in a lookahead's steps, one per row after the decode rows."""
    tables: list[list[int]]  # each lane's block table
    inputs: np.ndarray  # [4, steps, lanes] int64: token, position, slot (-1: none), context length (0: none)


class GreedyTokens:
    """A lookahead's tokens and logprobs, copied to the host behind the device's work; `result()` waits
    for this lookahead only, not for work queued after it."""

    def __init__(self, tokens: torch.Tensor, logprobs: torch.Tensor) -> None:
        self._event = None
        if tokens.is_cuda:
            tokens = tokens.to("cpu", non_blocking=True)
            logprobs = logprobs.to("cpu", non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        self._tokens, self._logprobs = tokens, logprobs

    def result(self) -> tuple[list[list[int]], list[list[float]]]:
        """Per row (request), its tokens and their logprobs in step order."""
        if self._event is not None:
            self._event.synchronize()
        return self._tokens.T.tolist(), self._logprobs.T.tolist()
