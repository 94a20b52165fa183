"""CUDA graphs of the decode-only forward pass at bucketed batch sizes.

A step whose rows are all single tokens (the steady state of generation) replays the graph of the
smallest bucket that holds it, after copying its inputs into the graph's static tensors; the rows
past the batch are padding: slot -1 (the cache write skips it) and context length 0 (attention
reads nothing). Steps with a prompt chunk, KV saving, or more rows than the largest bucket run eager,
except a lookahead's prompt lanes (prompt_lanes.py): with `max_lanes`, every bucket from 16 rows on
(up to `max_lanes` past the largest batch) also has a mixed graph, whose prefill kernel attends them.
A decode-only step whose contexts are spread (one far longer than the batch's share of a program slot:
`spread_contexts`) replays its bucket's "spread" graph, whose decode kernel splits contexts in up to
SPREAD_SPLITS parts; buckets small enough to split anyway have none. Graphs are keyed (bucket, kind).

With `use_graphs=False` nothing is captured and a "replay" runs the model eagerly on the same static
tensors: CPUs run the Triton backend's decode path this way (through Triton's interpreter) in tests.
"""
from __future__ import annotations

import bisect
import logging
from dataclasses import replace

import numpy as np
import torch

from tandem.engine import ops
from tandem.engine.attention import SeqSlice
from tandem.engine.attention_triton import DecodeMeta, PrefillMeta, TritonAttention
from tandem.engine.prompt_lanes import LANE_SPLITS, MAX_SEQS, PromptLanes
from tandem.kernels.paged_decode_attention import (SPREAD_MIN_SPLIT_TOKENS, SPREAD_SPLITS, choose_num_splits, sm_count,
                                                   spread_contexts)

log = logging.getLogger("tandem.engine")


def bucket_sizes(max_batch: int) -> list[int]:
    sizes = [b for b in (1, 2, 4, 8) if b < max_batch] + list(range(16, max_batch, 16))
    return sizes + [max_batch]


class DecodeGraphs:
    def __init__(self, model, kv_caches: list[torch.Tensor], scale: float, max_batch: int, max_model_len: int,
                 block_size: int, max_lanes: int = 0, use_graphs: bool = True) -> None:
        self.model = model
        self.use_graphs = use_graphs
        self.max_lanes = max_lanes
        self.buckets = bucket_sizes(max_batch + max_lanes)
        # a decode-only step holds at most max_batch rows: its graphs stop at the bucket that holds them
        self.decode_buckets = self.buckets[:bisect.bisect_left(self.buckets, max_batch) + 1]
        max_batch = self.buckets[-1]
        self.max_model_len = max_model_len
        device = kv_caches[0].device
        max_blocks = -(-max_model_len // block_size)
        # host staging (pinned) and device copies of every input, sized for the largest bucket
        self.host = {"input_ids": np.zeros(max_batch, np.int64), "positions": np.zeros(max_batch, np.int64),
                     "slots": np.full(max_batch, -1, np.int64), "context_lens": np.zeros(max_batch, np.int32),
                     "block_tables": np.zeros((max_batch, max_blocks), np.int32),
                     "lane_cu": np.zeros(MAX_SEQS + 1, np.int32), "lane_lens": np.zeros(MAX_SEQS, np.int32),
                     "lane_tables": np.zeros((MAX_SEQS, max_blocks), np.int32)}
        pin = device.type == "cuda"
        self.pinned = {k: torch.from_numpy(v).pin_memory() if pin else torch.from_numpy(v) for k, v in self.host.items()}
        self.host = {k: v.numpy() for k, v in self.pinned.items()}  # write straight into pinned memory
        self.dev = {k: v.to(device, copy=True) for k, v in self.pinned.items()}
        plain = {b: TritonAttention(kv_caches, self.dev["slots"][:b], scale, model.shape.sliding_window,
                                    decode=DecodeMeta(0, self.dev["block_tables"][:b], self.dev["context_lens"][:b],
                                                      max_model_len))
                 for b in self.buckets}
        self.num_kv, self.sms = num_kv, sms = kv_caches[0].shape[3], sm_count(device)
        lanes = PrefillMeta(0, self.dev["lane_cu"], self.dev["lane_lens"], self.dev["lane_tables"], 0,
                            num_splits=LANE_SPLITS if device.type == "cuda" else 2, packed=True)
        # a mixed step's decode rows are few (the lanes are most of it, and the decode kernel skips them)
        # and their contexts spread: split them as for a small batch, not as for b rows
        splits = choose_num_splits(8, num_kv, max_model_len, sms, SPREAD_MIN_SPLIT_TOKENS)
        self.attn: dict[tuple[int, str], TritonAttention] = {(b, "plain"): plain[b] for b in self.decode_buckets}
        self.attn.update({(b, "spread"): replace(plain[b], decode=replace(plain[b].decode, num_splits=SPREAD_SPLITS,
                                                                          min_split_tokens=SPREAD_MIN_SPLIT_TOKENS))
                          for b in self.decode_buckets
                          if b >= 16 and choose_num_splits(b, num_kv, max_model_len, sms) < SPREAD_SPLITS})
        self.attn.update({(b, "lanes"): replace(a, decode=replace(a.decode, num_splits=splits,
                                                                  min_split_tokens=SPREAD_MIN_SPLIT_TOKENS),
                                                prefill=replace(lanes, num_rows=b, max_query_len=min(b, max_lanes)))
                          for b, a in plain.items() if max_lanes and b >= 16})
        self.mixed_buckets = sorted(b for b, kind in self.attn if kind == "lanes")
        self.graphs: dict[tuple[int, str], tuple[torch.cuda.CUDAGraph | None, torch.Tensor | None]] = {}
        self._uploaded: torch.cuda.Event | None = None

    @property
    def max_decode_rows(self) -> int:
        """The most rows a decode-only replay holds."""
        return self.decode_buckets[-1]

    @property
    def max_mixed_rows(self) -> int:
        """The most rows a replay with prompt lanes holds (0: no lanes)."""
        return self.mixed_buckets[-1] if self.mixed_buckets else 0

    @torch.inference_mode()
    def capture(self) -> None:
        """Largest bucket first, so the smaller ones reuse its memory from the shared pool."""
        if not self.use_graphs:
            self.graphs = {key: (None, None) for key in self.attn}
            return
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for key in sorted(self.attn, key=lambda k: -k[0]):
                b = key[0]
                args = (self.dev["input_ids"][:b], self.dev["positions"][:b], self.attn[key])
                self.model(*args)  # compiles the kernels and sets up cuBLAS outside the capture
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=stream):
                    hidden = self.model(*args)
                self.graphs[key] = (graph, hidden)
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        log.info("captured decode CUDA graphs for batch sizes %s (spread from %s, with prompt lanes from %s)",
                 self.decode_buckets, min((b for b, kind in self.attn if kind == "spread"), default=None),
                 min(self.mixed_buckets, default=None))

    def _stage(self, input_ids: list[int], positions: list[int], slots: list[int], seqs: list[SeqSlice],
               lanes: PromptLanes | None = None) -> tuple[int, str] | None:
        """Copies a decode-only step's inputs into the graphs' static tensors (and the prompt lanes'
        tables: their rows' inputs change every step); returns the graph's key."""
        n = len(seqs)
        rows = n + (lanes.rows.shape[2] if lanes else 0)
        buckets = self.mixed_buckets if lanes else self.decode_buckets
        if rows > buckets[-1] or len(input_ids) != n or not self.graphs:
            return None
        b = buckets[bisect.bisect_left(buckets, rows)]
        self._host_free()
        h = self.host
        h["input_ids"][:n] = input_ids
        h["input_ids"][n:b] = 0  # padding rows: a valid id (a row fed on the device left a placeholder here)
        h["positions"][:n] = positions
        h["slots"][:n] = slots
        h["slots"][n:b] = -1
        h["context_lens"][:n] = [s.context_len for s in seqs]
        h["context_lens"][n:b] = 0
        self._fill_tables([s.block_table for s in seqs])
        if lanes:  # before _upload, whose event then covers this copy too
            self._fill_tables(lanes.tables, "lane_tables")
            self.dev["lane_tables"].copy_(self.pinned["lane_tables"], non_blocking=True)
        self._upload(("input_ids", "positions", "slots", "context_lens", "block_tables"), b)
        if lanes:
            return b, "lanes"
        ctx = h["context_lens"][:n]
        spread = (b, "spread") in self.attn and spread_contexts(int(ctx.max()), int(ctx.sum()), n, self.num_kv,
                                                                      self.sms)
        return b, "spread" if spread else "plain"

    def _fill_tables(self, tables: list[list[int]], key: str = "block_tables") -> None:
        host = self.host[key]
        for i, t in enumerate(tables):
            host[i, :len(t)] = t

    def _upload(self, keys: tuple[str, ...], b: int) -> None:
        for key in keys:
            self.dev[key][:b].copy_(self.pinned[key][:b], non_blocking=True)
        if self.dev["input_ids"].is_cuda:
            self._uploaded = torch.cuda.Event()
            self._uploaded.record()

    def _host_free(self) -> None:
        """The pinned staging buffers may be rewritten: their last upload has run. With a lookahead in
        flight the host stages the next one while the device may not have reached the last copy."""
        if self._uploaded is not None:
            self._uploaded.synchronize()
            self._uploaded = None

    def run(self, input_ids: list[int], positions: list[int], slots: list[int],
            seqs: list[SeqSlice]) -> torch.Tensor | None:
        """The hidden states of a decode-only step, or None when this step cannot replay a graph."""
        key = self._stage(input_ids, positions, slots, seqs)
        if key is None:
            return None
        return self._replay(key)[:len(seqs)]

    def _replay(self, key: tuple[int, str]) -> torch.Tensor:
        """The forward pass of a graph key (bucket, kind) on the static inputs: its graph, or the model
        run eagerly."""
        graph, hidden = self.graphs[key]
        if graph is None:
            b = key[0]
            return self.model(self.dev["input_ids"][:b], self.dev["positions"][:b], self.attn[key])
        graph.replay()
        return hidden

    def run_greedy_steps(self, input_ids: list[int], positions: list[int], slots: list[int], seqs: list[SeqSlice],
                         steps: int, block_size: int, logits_of, ban_ids: list[int], ban_steps: list[int],
                         lanes: "PromptLanes | None" = None, feed: tuple | None = None) -> "GreedyTokens | None":
        """`steps` greedy decode steps with no host round trip: each step's argmax is the next step's
        input, positions, slots and context lengths advance on the device. The block tables must cover
        every position. Returns the tokens and their logprobs (raw distribution), on their way to the host.
        Row i cannot pick `ban_ids` in its first `ban_steps[i]` steps (min_tokens). `lanes`: prompt tokens
        computed alongside, rows after the decode rows. `feed`: (GreedyTokens, rows, their rows there):
        those rows' inputs are that earlier lookahead's last tokens, which the host has not read."""
        key = self._stage(input_ids, positions, slots, seqs, lanes)
        if key is None:
            return None
        d, n = self.dev, len(seqs)
        device = d["input_ids"].device
        if feed is not None:  # behind the upload on the same stream, so it overwrites the placeholders
            earlier, rows, theirs = feed
            last = earlier.last.index_select(0, _to_device(theirs, device))
            d["input_ids"].index_copy_(0, _to_device(rows, device), last)
        tokens = torch.empty(steps, n, dtype=torch.long, device=device)
        logprobs = torch.empty(steps, n, dtype=torch.float32, device=device)
        banned = ban_left = None
        if ban_ids:  # uploads from pinned memory: a plain one would wait for the device (a lookahead in flight)
            banned = _to_device(ban_ids, device)
            ban_left = _to_device(ban_steps, device)
        per_step = None
        if lanes:
            per_step = [_to_device(lanes.rows, device), _to_device(lanes.cu, device), _to_device(lanes.lens, device)]
        ids, pos, ctx, slot = d["input_ids"][:n], d["positions"][:n], d["context_lens"][:n], d["slots"][:n]
        table = d["block_tables"][:n]
        for k in range(steps):
            if per_step is not None:  # the prompt lanes' rows and sequences at step k
                rows_k, cu, lens = per_step
                for name, values in zip(("input_ids", "positions", "slots"), rows_k[:, k]):
                    d[name][n:n + values.shape[0]].copy_(values)
                d["lane_cu"].copy_(cu[k])
                d["lane_lens"].copy_(lens[k])
            logits = logits_of(self._replay(key)[:n])
            # token and logprob of step k, then the rows' next inputs
            ops.greedy_advance(logits, tokens[k], logprobs[k], ids, pos, ctx, slot, table, block_size, banned,
                               ban_left, k)
        return GreedyTokens(tokens, logprobs)


def _to_device(values: "list[int] | np.ndarray", device: torch.device) -> torch.Tensor:
    t = torch.as_tensor(values, dtype=torch.long)
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t


class GreedyTokens:
    """A lookahead's tokens and logprobs, copied to the host behind the device's work; `result()` waits
    for this lookahead only, not for work queued after it."""

    def __init__(self, tokens: torch.Tensor, logprobs: torch.Tensor) -> None:
        self.last = tokens[-1]  # the rows' last tokens where the device left them (a next lookahead's inputs)
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
