"""One greedy decode step's tail in two launches: each row's argmax token and its logprob (raw
distribution) from the logits in their own dtype, and the row's next inputs advanced in place (input
id, position, context length, next KV slot from its block table). The multi-step loop
(tandem/engine/cuda_graphs.py) runs it after every step; in torch it is ~15 kernels and a float32
copy of the logits, read four times.

Stage 1, one program per (row, vocabulary chunk): the chunk's max and sum of exp (for the row's
log-sum-exp) and its argmax with the row's banned ids left out while ban_left[row] > step (min_tokens).
Stage 2, one program per row: merges the chunks (ties go to the lowest id, as torch.argmax does)
and writes the outputs.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from tandem.kernels.pdl import launch_options, wait_for_inputs
from tandem.kernels.reference import greedy_advance_ref

__all__ = ["compile_variants", "greedy_advance", "greedy_advance_ref"]

_CHUNK = 2048


# num_banned unspecialized and looped over: one compiled variant bans any number of ids (one EOS id or
# Llama 3's three), so the one compile_variants makes at start-up is the one a min_tokens request meets
@triton.jit(do_not_specialize=["step", "num_banned"])
def _chunk_kernel(logits_ptr, stride, vocab, banned_ptr, num_banned, ban_left_ptr, step, part_ptr,
                  NUM_CHUNKS: tl.constexpr, CHUNK: tl.constexpr, HAS_BANS: tl.constexpr, PDL: tl.constexpr):
    wait_for_inputs(PDL)
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    cols = chunk * CHUNK + tl.arange(0, CHUNK)
    x = tl.load(logits_ptr + row * stride + cols, mask=cols < vocab, other=float("-inf")).to(tl.float32)
    m = tl.max(x, 0)
    s = tl.sum(tl.exp(x - m), 0)
    if HAS_BANS:
        active = tl.load(ban_left_ptr + row) > step
        for i in range(num_banned):
            x = tl.where(active & (cols == tl.load(banned_ptr + i)), float("-inf"), x)
    best = tl.max(x, 0)
    where = tl.argmax(x, 0)  # the first of equal maxima
    part = part_ptr + (row * NUM_CHUNKS + chunk) * 4
    tl.store(part, m)
    tl.store(part + 1, s)
    tl.store(part + 2, best)
    tl.store(part + 3, (chunk * CHUNK + where).to(tl.float32))  # ids < 2**24: exact in float32


@triton.jit(do_not_specialize=["table_width"])
def _merge_kernel(part_ptr, tokens_ptr, logprobs_ptr, input_ids_ptr, positions_ptr, context_lens_ptr, slots_ptr,
                  tables_ptr, table_width, NUM_CHUNKS: tl.constexpr, CHUNKS_PAD: tl.constexpr,
                  BLOCK_SIZE: tl.constexpr, PDL: tl.constexpr):
    wait_for_inputs(PDL)
    row = tl.program_id(0).to(tl.int64)
    chunks = tl.arange(0, CHUNKS_PAD)
    ok = chunks < NUM_CHUNKS
    part = part_ptr + (row * NUM_CHUNKS + chunks) * 4
    m = tl.load(part, mask=ok, other=float("-inf"))
    s = tl.load(part + 1, mask=ok, other=0.0)
    best = tl.load(part + 2, mask=ok, other=float("-inf"))
    where = tl.load(part + 3, mask=ok, other=0.0)
    top = tl.max(m, 0)
    lse = top + tl.log(tl.sum(s * tl.exp(m - top), 0))
    value = tl.max(best, 0)
    first = tl.min(tl.where(best == value, chunks, CHUNKS_PAD), 0)  # the lowest chunk holding the max
    token = tl.sum(tl.where(chunks == first, where, 0.0), 0).to(tl.int64)
    tl.store(tokens_ptr + row, token)
    tl.store(logprobs_ptr + row, value - lse)
    tl.store(input_ids_ptr + row, token)
    pos = tl.load(positions_ptr + row) + 1
    tl.store(positions_ptr + row, pos)
    tl.store(context_lens_ptr + row, tl.load(context_lens_ptr + row) + 1)
    index = pos // BLOCK_SIZE
    block = tl.load(tables_ptr + row * table_width + tl.minimum(index, table_width - 1)).to(tl.int64)
    tl.store(slots_ptr + row, tl.where(index < table_width, block * BLOCK_SIZE + pos % BLOCK_SIZE, -1))


def greedy_advance(logits: torch.Tensor, tokens: torch.Tensor, logprobs: torch.Tensor, input_ids: torch.Tensor,
                   positions: torch.Tensor, context_lens: torch.Tensor, slots: torch.Tensor,
                   block_tables: torch.Tensor, block_size: int, banned: torch.Tensor | None = None,
                   ban_left: torch.Tensor | None = None, step: int = 0) -> None:
    """For the n rows of logits [n, V]: tokens[i] = argmax (banned ids left out while ban_left[i] > step),
    logprobs[i] = its log-softmax under the unbanned logits; then input_ids[i] = tokens[i],
    positions[i] += 1, context_lens[i] += 1 and slots[i] = the KV slot of the new position
    (block_tables [n, W] int32; -1 past the table). All outputs are contiguous [n] tensors on logits'
    device: tokens, input_ids, positions, slots int64; logprobs float32; context_lens int32."""
    n, vocab = logits.shape
    specs = ((tokens, torch.int64), (input_ids, torch.int64), (positions, torch.int64), (slots, torch.int64),
             (logprobs, torch.float32), (context_lens, torch.int32))
    for t, dtype in specs:
        if t.shape != (n,) or t.dtype != dtype or not t.is_contiguous() or t.device != logits.device:
            raise ValueError(f"greedy_advance: outputs must be contiguous [{n}] on {logits.device} of their dtype "
                             f"({dtype} expected, got {tuple(t.shape)} {t.dtype} on {t.device})")
    if logits.stride(1) != 1 or vocab >= 2 ** 24:
        raise ValueError(f"greedy_advance: logits must be [n, V] with contiguous rows and V < 2**24, "
                         f"got {tuple(logits.shape)} with strides {logits.stride()}")
    if block_tables.dim() != 2 or block_tables.shape[0] != n or not block_tables.is_contiguous() \
            or block_tables.dtype != torch.int32:
        raise ValueError(f"greedy_advance: block_tables must be a contiguous int32 [{n}, W], "
                         f"got {tuple(block_tables.shape)} {block_tables.dtype}")
    if (banned is None) != (ban_left is None):
        raise ValueError("greedy_advance: banned and ban_left go together")
    if n == 0:
        return
    chunk = min(_CHUNK, triton.next_power_of_2(vocab))
    num_chunks = triton.cdiv(vocab, chunk)
    part = torch.empty(n, num_chunks, 4, dtype=torch.float32, device=logits.device)
    num_banned = banned.numel() if banned is not None else 0
    _chunk_kernel[(n, num_chunks)](logits, logits.stride(0), vocab, banned if num_banned else logits, num_banned,
                                   ban_left if num_banned else logits, step, part, NUM_CHUNKS=num_chunks,
                                   CHUNK=chunk, HAS_BANS=num_banned > 0,
                                   num_warps=4, **launch_options(logits.device, n))
    _merge_kernel[(n,)](part, tokens, logprobs, input_ids, positions, context_lens, slots, block_tables,
                        block_tables.shape[1], NUM_CHUNKS=num_chunks,
                        CHUNKS_PAD=triton.next_power_of_2(num_chunks), BLOCK_SIZE=block_size, num_warps=1,
                        **launch_options(logits.device, n))


def compile_variants(logits: torch.Tensor, block_size: int) -> None:
    """Runs greedy_advance on throwaway outputs for the launch variants an engine meets: one row (PDL on
    Hopper) and three, with and without banned ids, and a lookahead's step k writing its tokens and logprobs
    at row k of [steps, n] buffers (Triton compiles apart the pointers that are not 16-byte aligned: k = 1, 2).
    `logits` [>= 3, V]: the model's, as the lookaheads read them. Triton compiles a variant on its first
    launch; without this the first lookahead of a min_tokens request compiled one in the middle of a run."""
    device = logits.device
    for n in (1, 3):
        tokens = torch.zeros(3, n, dtype=torch.long, device=device)
        logprobs = torch.zeros(3, n, dtype=torch.float32, device=device)
        for banned in (None, torch.zeros(1, dtype=torch.long, device=device)):
            ban_left = None if banned is None else torch.ones(n, dtype=torch.long, device=device)
            for k in range(3):
                ints = [torch.zeros(n, dtype=torch.long, device=device) for _ in range(3)]
                greedy_advance(logits[:n], tokens[k], logprobs[k], ints[0], ints[1],
                               torch.ones(n, dtype=torch.int32, device=device), ints[2],
                               torch.zeros(n, 1, dtype=torch.int32, device=device), block_size, banned, ban_left, k)
