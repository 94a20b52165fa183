"""Tokenizers and chat templates through transformers, plus incremental detokenization."""
from __future__ import annotations

import json
import logging
import os
from typing import Any

from transformers import AutoTokenizer, PreTrainedTokenizerBase

log = logging.getLogger("tandem.engine")


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(path)


def eos_token_ids(model_path: str, tokenizer: PreTrainedTokenizerBase | None, vocab: int) -> tuple[int, ...]:
    """EOS ids from generation_config.json (int or list) and the tokenizer (or, with no tokenizer,
    config.json), those inside the vocabulary: one past it can never be sampled, and banning it before
    min_tokens would index past the logits (a device assert on CUDA). Random-weight configs carry
    Llama-3's ids (128001) on smaller vocabularies."""
    ids: list[int] = []
    gen = load_generation_config(model_path)
    if tokenizer is None and "eos_token_id" not in gen:
        with open(os.path.join(model_path, "config.json")) as f:
            gen = json.load(f)
    eos = gen.get("eos_token_id")
    ids += eos if isinstance(eos, list) else ([eos] if eos is not None else [])
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    if outside := [t for t in ids if not 0 <= t < vocab]:
        log.warning("ignoring EOS ids outside the %d-token vocabulary: %s", vocab, outside)
    return tuple(dict.fromkeys(t for t in ids if 0 <= t < vocab))


def load_generation_config(model_path: str) -> dict[str, Any]:
    path = os.path.join(model_path, "generation_config.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def apply_chat_template(tokenizer: PreTrainedTokenizerBase, messages: list[dict], *,
                        add_generation_prompt: bool = True, continue_final_message: bool = False,
                        chat_template: str | None = None, tools: list | None = None,
                        **template_kwargs: Any) -> str:
    if chat_template is None and tokenizer.chat_template is None:
        raise ValueError("this model has no chat template; pass chat_template")
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt and not continue_final_message,
        continue_final_message=continue_final_message, chat_template=chat_template, tools=tools,
        **template_kwargs)


class TokenTexts:
    """Each token on its own as text, cached (logprobs ask for the same ids again and again; the cache
    stops growing at `limit` entries)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, limit: int = 200_000) -> None:
        self.tokenizer, self.limit = tokenizer, limit
        self._texts: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._texts.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id])
            if len(self._texts) < self.limit:
                self._texts[token_id] = text
        return text


class NoDetokenizer:
    """Stands in for IncrementalDetokenizer when the engine has no tokenizer: token ids only."""

    text = ""

    def add(self, token_id: int) -> str:
        return ""


class IncrementalDetokenizer:
    """Text of a growing token list, emitted only once it is complete: a multi-byte character
    split across tokens shows up when its last byte arrives, never as a replacement character.
    Decodes a small window (a few tokens of context plus the new ones) each step."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, prompt_token_ids: list[int],
                 skip_special_tokens: bool = True, spaces_between_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids = list(prompt_token_ids[-6:])
        self.read_offset = len(self.ids)
        self.prefix_offset = max(self.read_offset - 5, 0)
        self.text = ""

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_id: int) -> str:
        """Append one token; returns the new text it completes (may be empty)."""
        self.ids.append(token_id)
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset:])
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return ""
        delta = new_text[len(prefix_text):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        if self.prefix_offset > 64:  # keep the window small
            drop = self.prefix_offset - 8
            self.ids = self.ids[drop:]
            self.prefix_offset -= drop
            self.read_offset -= drop
        self.text += delta
        return delta


def find_stop(text: str, delta_len: int, stops: list[str]) -> tuple[int, str] | None:
    """The earliest stop string that ends inside the newest `delta_len` characters."""
    best: tuple[int, str] | None = None
    for stop in stops:
        start = max(0, len(text) - delta_len - len(stop) + 1)
        i = text.find(stop, start)
        if i != -1 and (best is None or i < best[0]):
            best = (i, stop)
    return best


# generation_config.json keys that become default sampling parameters (vLLM's behaviour)
_GEN_DEFAULTS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                 "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}


def sampling_defaults(model_path: str, generation_config: str = "auto") -> dict[str, Any]:
    """SamplingParams defaults from generation_config.json ('auto': the model's; 'vllm' or 'none':
    none; or a folder holding one)."""
    if generation_config in ("vllm", "none"):
        return {}
    if generation_config != "auto" and not os.path.isdir(generation_config):
        raise ValueError(f"generation_config must be 'auto', 'vllm', 'none' or a folder; {generation_config!r} "
                         "is none of them")
    gen = load_generation_config(model_path if generation_config == "auto" else generation_config)
    return {ours: gen[theirs] for theirs, ours in _GEN_DEFAULTS.items() if theirs in gen}
