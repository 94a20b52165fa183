"""Logits to tokens: structured outputs' masks, penalties, bad words, min_tokens, then greedy or temperature / top-k / top-p /
min-p sampling, and logprobs of the model's raw distribution (as vLLM reports them).

One row per sample to draw. Work is batched across rows; only seeded rows draw their noise from
their own generator, so a seeded request samples the same tokens whatever else is in the batch.
A seeded row's noise depends only on (seed, output position), not on earlier draws: a sequence
continued on another worker after a failure samples what it would have sampled here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from tandem.engine import structured
from tandem.outputs import Logprob
from tandem.sampling_params import SamplingParams


class SampleRow(Protocol):
    """What the sampler reads of a sequence (the engine passes its Requests)."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    seed: int | None  # the sequence's seed; the draw at each output position is seeded from it
    grammar: Any  # structured outputs' matcher, or None


@dataclass
class Sample:
    token_id: int
    logprob: float | None  # of the sampled token under the raw distribution; None where not wanted
    top: dict[int, Logprob] | None  # requested top logprobs plus the sampled token


def wants_float_logits(rows: list[SampleRow]) -> bool:
    """Whether sampling these rows reads more of the logits than their argmax. Plain greedy rows (no
    penalties, no logprobs) take the argmax in the model's own dtype: the same token, since widening is
    exact, without writing a float32 copy of [rows, vocab] and its log_softmax every step."""
    return any(not r.params.greedy or r.params.wants_logprob or r.params.penalized for r in rows)


def _penalize(logits: torch.Tensor, rows: list[SampleRow]) -> None:
    for i, row in enumerate(rows):
        p = row.params
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(row.prompt_token_ids) | set(row.output_token_ids)), dtype=torch.long,
                                device=logits.device)
            vals = logits[i, seen]
            logits[i, seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if (p.frequency_penalty or p.presence_penalty) and row.output_token_ids:
            ids, counts = torch.tensor(row.output_token_ids, dtype=torch.long, device=logits.device).unique(
                return_counts=True)
            logits[i, ids] -= p.frequency_penalty * counts.to(logits.dtype) + p.presence_penalty


def _ban(logits: torch.Tensor, rows: list[SampleRow]) -> None:
    """-inf for EOS and stop ids before min_tokens, and for the last token of a bad word whose prefix
    was just generated; one indexed write for the whole batch."""
    row_idx: list[int] = []
    col_idx: list[int] = []
    for i, row in enumerate(rows):
        p = row.params
        banned: list[int] = []
        if len(row.output_token_ids) < p.min_tokens:
            banned += list(p.stop_token_ids) + list(p._eos_token_ids)
        out = row.output_token_ids
        for word in p._bad_words_token_ids:
            prefix = word[:-1]
            if not prefix or out[len(out) - len(prefix):] == prefix:
                banned.append(word[-1])
        row_idx += [i] * len(banned)
        col_idx += banned
    if row_idx:
        logits[torch.tensor(row_idx, device=logits.device), torch.tensor(col_idx, device=logits.device)] = float("-inf")


def _filter(logits: torch.Tensor, rows: list[SampleRow]) -> torch.Tensor:
    """Temperature, then min-p, then top-k and top-p (vLLM's order) on the non-greedy rows;
    returns probabilities."""
    # which filters apply is read off the parameters on the host: no device round trip
    dev = logits.device
    temps = torch.tensor([r.params.temperature for r in rows], dtype=logits.dtype, device=dev)
    logits = logits / temps[:, None]
    top_k = torch.tensor([r.params.top_k or logits.shape[1] for r in rows], device=dev)
    top_p = torch.tensor([r.params.top_p for r in rows], dtype=logits.dtype, device=dev)
    min_p = torch.tensor([r.params.min_p for r in rows], dtype=logits.dtype, device=dev)
    if any(r.params.min_p > 0 for r in rows):
        probs = logits.softmax(dim=-1)
        limit = probs.max(dim=-1, keepdim=True).values * min_p[:, None]
        logits = logits.masked_fill(probs < limit, float("-inf"))
    if any((r.params.top_k or logits.shape[1]) < logits.shape[1] or r.params.top_p < 1 for r in rows):
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        ranks = torch.arange(logits.shape[1], device=dev)[None, :]
        drop = ranks >= top_k[:, None]
        probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # mass of strictly better tokens
        drop |= before > top_p[:, None]
        drop[:, 0] = False
        logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return logits.softmax(dim=-1)


_GOLDEN = 0x9E3779B97F4A7C15


def _draw(probs: torch.Tensor, rows: list[SampleRow]) -> torch.Tensor:
    """Gumbel-style draw: argmax(p / E) with E ~ Exp(1), per-row seeded noise where seeded."""
    noise = torch.empty_like(probs).exponential_()
    generator = None
    for i, row in enumerate(rows):
        if row.seed is not None:
            generator = generator or torch.Generator()
            generator.manual_seed((row.seed + len(row.output_token_ids) * _GOLDEN) % 2**63)
            noise[i] = torch.empty(probs.shape[1], dtype=probs.dtype).exponential_(generator=generator).to(noise.device)
    return (probs / noise).argmax(dim=-1)


def sample(logits: torch.Tensor, rows: list[SampleRow]) -> list[Sample]:
    """logits: [len(rows), vocab], the model's raw output for each row (float32 where
    wants_float_logits(rows)); modified in place."""
    grammars = [r.grammar for r in rows]
    if any(g is not None for g in grammars):  # first: logprobs are of what the grammar allows, as vLLM's
        structured.mask(logits, grammars)
    wanted = any(r.params.wants_logprob for r in rows)
    raw_logprobs = logits.log_softmax(dim=-1) if wanted else None  # cumulative logprobs rank best_of samples
    _penalize(logits, rows)
    _ban(logits, rows)
    tokens = logits.max(dim=-1).indices  # argmax's first-index ties, but 2.5x faster on CPUs
    sampled = [i for i, r in enumerate(rows) if not r.params.greedy]
    if sampled:
        idx = torch.tensor(sampled, device=logits.device)
        sub = [rows[i] for i in sampled]
        tokens[idx] = _draw(_filter(logits[idx], sub), sub)
    if raw_logprobs is None:
        return [Sample(tok, None, None) for tok in tokens.tolist()]  # the step's one wait for the device
    chosen_logprobs = raw_logprobs.gather(1, tokens[:, None])[:, 0]
    tokens, chosen_logprobs = tokens.tolist(), chosen_logprobs.tolist()  # the step's one wait for the device
    out: list[Sample] = []
    for i, (row, tok, chosen) in enumerate(zip(rows, tokens, chosen_logprobs)):
        if row.params.logprobs is None:
            out.append(Sample(tok, chosen if row.params.wants_logprob else None, None))
            continue
        lp = raw_logprobs[i]
        top: dict[int, Logprob] = {}
        if row.params.logprobs:
            vals, ids = lp.topk(row.params.logprobs)
            for rank, (v, t) in enumerate(zip(vals.tolist(), ids.tolist()), start=1):
                top[t] = Logprob(v, rank)
        if tok not in top:
            top[tok] = Logprob(chosen, int((lp > lp[tok]).sum().item()) + 1)
        out.append(Sample(tok, chosen, top))
    return out


def prompt_logprobs(logits: torch.Tensor, next_tokens: list[int], k: int) -> list[dict[int, Logprob]]:
    """Logprobs of each actual next prompt token (plus the top k) from the logits before it."""
    lp = logits.log_softmax(dim=-1)
    out = []
    for i, tok in enumerate(next_tokens):
        entry: dict[int, Logprob] = {}
        if k:
            vals, ids = lp[i].topk(k)
            for rank, (v, t) in enumerate(zip(vals.tolist(), ids.tolist()), start=1):
                entry[t] = Logprob(v, rank)
        if tok not in entry:
            entry[tok] = Logprob(lp[i, tok].item(), int((lp[i] > lp[i, tok]).sum().item()) + 1)
        out.append(entry)
    return out
