"""The offline API, vLLM's shape: `LLM(model=...).generate(prompts, SamplingParams(...))`."""
from __future__ import annotations

import itertools
from typing import Any, Sequence

from tqdm.auto import tqdm

from tandem.config import CacheConfig, EngineConfig, GroupConfig, SchedulerConfig
from tandem.engine.engine import LLMEngine
from tandem.engine.lora import LoRARequest
from tandem.outputs import RequestOutput
from tandem.sampling_params import SamplingParams
from tandem.tokenizer import TokenTexts, apply_chat_template

PromptType = str | list[int] | dict


class LLM:
    """A colocated engine for batch generation.

    `model=None` is the embedded SmolLM2-135M-Instruct. Other arguments use vLLM's names.
    """

    def __init__(self, model: str | None = None, *, tokenizer: str | None = None, dtype: str = "auto",
                 max_model_len: int | None = None, enable_prefix_caching: bool = True, block_size: int = 16,
                 num_gpu_blocks_override: int | None = None, gpu_memory_utilization: float = 0.9,
                 max_num_seqs: int = 256, max_num_batched_tokens: int = 2048, scheduling_policy: str = "fcfs",
                 enable_chunked_prefill: bool = True, seed: int = 0, device: str = "auto",
                 generation_config: str = "auto", cpu_kv_cache_gib: float = 4.0, enforce_eager: bool = False,
                 load_format: str = "auto", skip_tokenizer_init: bool = False, num_scheduler_steps: int = 8,
                 enable_lora: bool = False, max_lora_rank: int = 64, max_loras: int | None = None,
                 tensor_parallel_size: int = 1, pipeline_parallel_size: int = 1, group: GroupConfig | None = None,
                 **unused: Any) -> None:
        """`enable_lora` is taken for vLLM's sake: adapters load when a LoRARequest first names them, and all of
        them stay loaded; `max_loras` bounds how many the running requests use at once (vLLM's). `group`: the hosts a tensor/pipeline-parallel group spans (this one,
        by default; config.GroupConfig)."""
        if unused:
            raise TypeError(f"unknown LLM arguments: {', '.join(sorted(unused))}")
        config = EngineConfig(
            model=model, tokenizer=tokenizer, dtype=dtype, device=device, max_model_len=max_model_len, seed=seed,
            generation_config=generation_config, enforce_eager=enforce_eager, load_format=load_format,
            skip_tokenizer_init=skip_tokenizer_init, max_lora_rank=max_lora_rank,
            tensor_parallel_size=tensor_parallel_size, pipeline_parallel_size=pipeline_parallel_size,
            group=group or GroupConfig(),
            cache=CacheConfig(block_size=block_size, num_gpu_blocks=num_gpu_blocks_override,
                              gpu_memory_utilization=gpu_memory_utilization, cpu_kv_cache_gib=cpu_kv_cache_gib,
                              enable_prefix_caching=enable_prefix_caching),
            scheduler=SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                                      policy=scheduling_policy, enable_chunked_prefill=enable_chunked_prefill,
                                      num_scheduler_steps=num_scheduler_steps, max_loras=max_loras))
        self.engine = LLMEngine(config)
        self.engine.stream_outputs = False  # generate() returns whole outputs: no per-step snapshots
        self._ids = itertools.count()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        return self.engine.default_sampling_params()

    def generate(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True, priority: list[int] | None = None,
                 lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None) -> list[RequestOutput]:
        """One RequestOutput per prompt, in order. Bad input raises ValueError before any work starts.
        `lora_request`: the adapter every prompt runs under, or one (or None) per prompt."""
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts
                                                and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        params = list(sampling_params) if isinstance(sampling_params, (list, tuple)) else \
            [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} sampling_params for {len(prompts)} prompts")
        if priority is not None and len(priority) != len(prompts):
            raise ValueError(f"got {len(priority)} priorities for {len(prompts)} prompts")
        loras = list(lora_request) if isinstance(lora_request, (list, tuple)) else [lora_request] * len(prompts)
        if len(loras) != len(prompts):
            raise ValueError(f"got {len(loras)} lora_requests for {len(prompts)} prompts")
        for lora in {lr for lr in loras if lr is not None}:
            self.engine.add_lora(lora.lora_name, lora.lora_path)
        params = [sp if lr is None else sp.clone(lora=lr.lora_name) for sp, lr in zip(params, loras)]
        for p, sp in zip(prompts, params):  # validate everything before queueing anything
            self.engine.process_prompt(p)
            self.engine.check_params(sp)
        ids = [f"offline-{next(self._ids)}" for _ in prompts]
        try:
            for i, (rid, prompt, sp) in enumerate(zip(ids, prompts, params)):
                self.engine.add_request(rid, prompt, sp, priority=priority[i] if priority else 0)
        except BaseException:
            self.engine.abort_request(ids)
            raise
        return self._run(ids, use_tqdm)

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        done: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="Processed prompts", disable=not use_tqdm or len(ids) < 8)
        try:
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.finished:
                        done[out.request_id] = out
                        bar.update(1)
        except BaseException:
            self.engine.abort_request(list(self.engine.groups))
            raise
        finally:
            bar.close()
        outs = [done[i] for i in ids]
        if self.engine.tokenizer is not None:
            self._decode_logprobs(outs)
        return outs

    def _decode_logprobs(self, outs: list[RequestOutput]) -> None:
        """Each logprob entry's token as text (`decoded_token`), as vLLM's offline outputs carry it; here and
        not in the engine, whose other callers (the servers) render tokens their own way."""
        text = TokenTexts(self.engine.tokenizer)
        for out in outs:
            for entries in [out.prompt_logprobs or []] + [o.logprobs or [] for o in out.outputs]:
                for entry in entries:
                    for t, lp in (entry or {}).items():
                        lp.decoded_token = text(t)

    def chat(self, messages: list[dict] | list[list[dict]], sampling_params: SamplingParams | None = None,
             use_tqdm: bool = True, chat_template: str | None = None, add_generation_prompt: bool = True,
             continue_final_message: bool = False, chat_template_kwargs: dict | None = None,
             tools: list | None = None,
             lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None) -> list[RequestOutput]:
        """Apply the model's chat template to each conversation, then generate (under `lora_request`'s adapter)."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        tok = self.engine.tokenizer
        prompts, texts = [], []
        for conv in conversations:
            text = apply_chat_template(tok, conv, add_generation_prompt=add_generation_prompt,
                                       continue_final_message=continue_final_message, chat_template=chat_template,
                                       tools=tools, **(chat_template_kwargs or {}))
            prompts.append({"prompt_token_ids": tok.encode(text, add_special_tokens=False)})
            texts.append(text)
        outs = self.generate(prompts, sampling_params, use_tqdm=use_tqdm, lora_request=lora_request)
        for out, text in zip(outs, texts):
            out.prompt = text  # the templated conversation, as vLLM reports it
        return outs

    def stats(self):
        return self.engine.stats()
