"""Sampling parameters, vLLM's `SamplingParams` shape, validated on construction."""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field, fields
from typing import Any

_EPS = 1e-5


@dataclass
class SamplingParams:
    """How to sample one request's output. Invalid values raise ValueError naming the field."""

    n: int = 1
    best_of: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    # one constraint on the output: {"json": schema} | {"json_object": True} | {"regex": ...} |
    # {"choice": [...]} | {"grammar": EBNF} (tandem/engine/structured.py)
    structured_outputs: dict[str, Any] | None = None
    # the LoRA adapter this request runs under, by its name in the engine's lora_modules (vLLM passes a
    # LoRARequest beside the params; LLM.generate takes one too)
    lora: str | None = None
    # Filled by the engine: the model's EOS ids (they end generation unless ignore_eos, and are banned
    # before min_tokens either way), and the token-id sequences of bad_words.
    _eos_token_ids: tuple[int, ...] = field(default=(), repr=False)
    _bad_words_token_ids: list[list[int]] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        elif isinstance(self.stop, (list, tuple)) and all(isinstance(s, str) for s in self.stop):
            self.stop = list(self.stop)
        else:
            raise ValueError(f"stop must be a string or a list of strings, got {self.stop!r}")
        self.stop_token_ids = list(self.stop_token_ids or [])
        # one word may come bare, as a stop string may: a string is not a list of one-letter words
        self.bad_words = [self.bad_words] if isinstance(self.bad_words, str) else list(self.bad_words or [])
        if self.best_of is None:
            self.best_of = self.n
        if self.top_k == -1:
            self.top_k = 0
        self._verify()
        if self.temperature < _EPS:  # greedy: the other sampling knobs do nothing
            self.top_p, self.top_k, self.min_p = 1.0, 0, 0.0

    def _verify(self) -> None:
        def need(ok: bool, name: str, limit: str) -> None:
            if not ok:
                raise ValueError(f"{name} must be {limit}, got {getattr(self, name)!r}")

        def integer(x: Any) -> bool:  # numpy's too; not bool
            return isinstance(x, numbers.Integral) and not isinstance(x, bool)

        def real(x: Any, low: float, high: float) -> bool:  # finite, within [low, high]
            return (isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)
                    and low <= x <= high)

        need(integer(self.n) and self.n >= 1, "n", "an integer >= 1")
        need(integer(self.best_of) and self.best_of >= self.n, "best_of", f"an integer >= n ({self.n})")
        need(real(self.presence_penalty, -2.0, 2.0), "presence_penalty", "a number in [-2, 2]")
        need(real(self.frequency_penalty, -2.0, 2.0), "frequency_penalty", "a number in [-2, 2]")
        need(real(self.repetition_penalty, 0.0, math.inf) and self.repetition_penalty > 0.0, "repetition_penalty",
             "a finite number > 0")
        need(real(self.temperature, 0.0, math.inf), "temperature", "a finite number >= 0")
        need(real(self.top_p, 0.0, 1.0) and self.top_p > 0.0, "top_p", "a number in (0, 1]")
        need(integer(self.top_k) and self.top_k >= 0, "top_k", "-1, 0 (off) or a positive integer")
        need(real(self.min_p, 0.0, 1.0), "min_p", "a number in [0, 1]")
        need(self.seed is None or (integer(self.seed) and -2**63 <= self.seed < 2**64), "seed",
             "None or an integer in [-2**63, 2**64)")
        need(self.max_tokens is None or (integer(self.max_tokens) and self.max_tokens >= 1),
             "max_tokens", "an integer >= 1")
        need(integer(self.min_tokens) and self.min_tokens >= 0, "min_tokens", "an integer >= 0")
        need(self.max_tokens is None or self.min_tokens <= self.max_tokens, "min_tokens",
             f"<= max_tokens ({self.max_tokens})")
        need(self.logprobs is None or (integer(self.logprobs) and self.logprobs >= 0), "logprobs",
             "None or an integer >= 0")
        need(self.prompt_logprobs is None or (integer(self.prompt_logprobs) and self.prompt_logprobs >= 0),
             "prompt_logprobs", "None or an integer >= 0")
        need(all(integer(t) and t >= 0 for t in self.stop_token_ids), "stop_token_ids",
             "a list of non-negative integers")
        need(all("" != s for s in self.stop), "stop", "non-empty strings")
        need(all(isinstance(w, str) and w for w in self.bad_words), "bad_words", "a list of non-empty strings")
        if self.structured_outputs is not None:
            from tandem.engine.structured import check_spec

            problem = check_spec(self.structured_outputs)
            need(problem is None, "structured_outputs", str(problem))

    @property
    def greedy(self) -> bool:
        return self.temperature < _EPS

    @property
    def wants_logprob(self) -> bool:
        """Whether the sampled tokens' logprobs are needed: asked for, or to rank best_of samples. Other
        requests report cumulative_logprob None, as vLLM does."""
        return self.logprobs is not None or self.best_of > self.n

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1.0 or bool(self.frequency_penalty) or bool(self.presence_penalty)

    def clone(self, **changes: Any) -> "SamplingParams":
        values = {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")}
        values.update(changes)
        out = SamplingParams(**values)
        out._eos_token_ids = self._eos_token_ids
        out._bad_words_token_ids = self._bad_words_token_ids
        return out
