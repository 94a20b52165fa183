"""Prompt lanes: prompt chunks computed inside a multi-step lookahead (multi_step.py), beside its
decode rows, in the same CUDA graph.

When the scheduler paced its prompt chunks over the lookahead (`SchedulerOutput.prompt_steps` > 1, the
lof policy), a chunk of T tokens is spread over the k steps, ceil(T / k) tokens a step. Each step's
prompt tokens are rows after the decode rows: the layer writes their K/V with everyone else's, the
decode kernel skips them (context 0), and the paged prefill kernel attends them, one sequence per chunk.
The graph's prefill launch has a fixed grid: its query tiles are numbered across the chunks (`packed`,
up to MAX_LANES rows in MAX_SEQS sequences; programs past the last tile exit at once), and each tile's
keys are cut into LANE_SPLITS slices, so a few short chunks over long prefixes still fill the GPU.

A prompt's last token is never a lane (its logits are its first sample): the request decodes from the
next lookahead on. The host packs every step's rows here, once per lookahead.

Measured on the H200 (bench/results/trace-8b-W2-20261202.txt): without the split, one program walked
a whole prefix and the prefill kernel took ~1.5 ms of a lane step on the 8B shape.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from tandem.engine.request import Request

MAX_LANES = 256  # prompt rows a step may carry: the graphs go this far past max_num_seqs
MAX_SEQS = 8  # prompt chunks a lookahead may carry: the prefill launch's sequences (lof: 2-4 typically)
# slices of each lane tile's keys on GPUs (H200, 8B W2 under lof, seconds of steps: 1 10.19, 2 9.79, 4 9.98, 8 10.17;
# since lane attention runs beside decode attention, out tok/s: 1 6,210, 2 6,097, 4 6,021; TANDEM_LANE_SPLITS
# sets it for such sweeps). CPUs keep 2: the tests cover the split path there.
LANE_SPLITS = int(os.environ.get("TANDEM_LANE_SPLITS", "1"))


@dataclass
class PromptLanes:
    tables: list[list[int]]  # each chunk's block table
    rows: np.ndarray  # [3, steps, lanes] int64: token, position, slot (-1: padding) of each prompt row
    cu: np.ndarray  # [steps, MAX_SEQS + 1]: chunk i's rows at step k are cu[k, i]:cu[k, i + 1] (batch rows)
    lens: np.ndarray  # [steps, MAX_SEQS]: chunk i's context length after step k (0: no chunk)


def pack(chunks: list[tuple[Request, int, int]], steps: int, tables: dict[str, list[int]], block_size: int,
         first_row: int) -> PromptLanes:
    """chunks: (request, tokens per step, its computed tokens at the end); their rows start at `first_row`."""
    lanes = sum(c for _, c, _ in chunks)
    rows = np.zeros((3, steps, lanes), np.int64)
    rows[2] = -1
    cu = np.full((steps, MAX_SEQS + 1), first_row, np.int64)
    lens = np.zeros((steps, MAX_SEQS), np.int64)
    filled = np.zeros(steps, np.int64)  # rows of each step taken by the chunks before this one
    for i, (req, per_step, end) in enumerate(chunks):  # all steps of a chunk at once: this runs between lookaheads
        start = req.num_computed_tokens
        first = start + np.arange(steps) * per_step  # each step's first position (past `end`: none)
        pos = first[:, None] + np.arange(per_step)[None, :]  # [steps, per_step]
        k, j = np.nonzero(pos < end)
        pos = pos[k, j]
        col = filled[k] + j
        table = np.asarray(tables[req.seq_id])
        rows[0, k, col] = np.asarray(req.all_token_ids[start:end])[pos - start]
        rows[1, k, col] = pos
        rows[2, k, col] = table[pos // block_size] * block_size + pos % block_size
        lo = np.minimum(first, end)
        hi = np.minimum(lo + per_step, end)
        filled += hi - lo
        cu[:, i + 1:] = first_row + filled[:, None]
        lens[:, i] = np.where(hi > lo, hi, 0)
    return PromptLanes([tables[r.seq_id] for r, _, _ in chunks], rows, cu, lens)
