"""Checks every entry point applies to a request before any engine sees it: the prompt (text or
token ids, in the vocabulary, shorter than the context) and the sampling limits that depend on
the model (vocabulary size, context length). The engine, the colocated server and the router all
use these, so a request is refused the same way wherever it enters."""
from __future__ import annotations

from dataclasses import dataclass
from itertools import repeat
from typing import Any

from tandem.sampling_params import SamplingParams


@dataclass
class InputChecker:
    tokenizer: Any
    vocab_size: int
    max_model_len: int

    def prompt(self, prompt: str | list[int] | dict) -> tuple[str | None, list[int]]:
        """Text, token ids, or {"prompt": ...} / {"prompt_token_ids": ...} to (text, ids), checked."""
        if isinstance(prompt, dict):
            prompt = prompt.get("prompt_token_ids", prompt.get("prompt"))
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this engine has no tokenizer (skip_tokenizer_init): prompts must be token ids")
            text, ids = prompt, self.tokenizer.encode(prompt)
        elif isinstance(prompt, (list, tuple)) and all(map(isinstance, prompt, repeat(int))):  # map: C speed
            text, ids = None, list(prompt)
            if ids and not (min(ids) >= 0 and max(ids) < self.vocab_size):
                bad = [t for t in ids if not 0 <= t < self.vocab_size]
                raise ValueError(f"prompt token ids must be in [0, {self.vocab_size}), got {bad[:5]}")
        else:
            raise ValueError(f"prompt must be a string or a list of token ids, got {type(prompt).__name__}")
        if not ids:
            raise ValueError("prompt must not be empty")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"prompt is {len(ids)} tokens, but max_model_len is {self.max_model_len}: "
                             "the prompt must be shorter to leave room for output")
        return text, ids

    def params(self, params: SamplingParams) -> None:
        """Limits SamplingParams cannot know: the vocabulary size."""
        vocab = self.vocab_size
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(params, name)
            if k is not None and k > vocab:
                raise ValueError(f"{name} must be <= the vocabulary size ({vocab}), got {k}")
        bad = [t for t in params.stop_token_ids if t >= vocab]
        if bad:
            raise ValueError(f"stop_token_ids must be < the vocabulary size ({vocab}), got {bad[:5]}")

    def request(self, prompt_token_ids: list[int], params: SamplingParams, max_model_len: int,
                resume_token_ids: list[int] = ()) -> list[int]:
        """A server request: prompt, parameters, and prompt + max_tokens within `max_model_len`
        (the serving limit, which the KV-cache size can make smaller than the model's)."""
        _, ids = self.prompt(list(prompt_token_ids))
        self.params(params)
        if params.max_tokens is not None and len(ids) + params.max_tokens > max_model_len:
            raise ValueError(f"prompt ({len(ids)} tokens) plus max_tokens ({params.max_tokens}) exceeds "
                             f"the maximum context length of {max_model_len} tokens")
        bad = [t for t in resume_token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"resume token ids must be in [0, {self.vocab_size}), got {bad[:5]}")
        return ids
