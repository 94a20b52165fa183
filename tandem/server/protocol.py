"""Request and response bodies of the OpenAI-compatible API (pydantic), with vLLM's extra fields.

Requests ignore unknown fields (as OpenAI and vLLM do) and refuse NaN and infinities. Limits that
need the model (context length, vocabulary) are checked by the serving code, not here.
"""
from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_N = 128  # samples per prompt; a bound so one request cannot exhaust memory


class OpenAIModel(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, protected_namespaces=())


# ---- shared pieces ---------------------------------------------------------------------------------


class StreamOptions(OpenAIModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM: usage in every chunk


class SamplingRequest(OpenAIModel):
    """Sampling fields common to completions and chat: OpenAI's, then vLLM's extras.
    None means unset: the model's generation_config.json, then OpenAI's default, applies."""

    model: str | None = Field(None, description="A served model name; defaults to the first one.")
    n: int = Field(1, ge=1, le=MAX_N)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-2**63, le=2**63 - 1)  # int64, as vLLM bounds it
    stream: bool = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = Field(None, description="Not supported: must be empty.")
    user: str | None = None
    # vLLM extras
    top_k: int | None = Field(None, ge=-1, description="-1 or 0: off.")
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0)
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    bad_words: list[str] | None = None
    # structured outputs, one of these at a time (tandem/engine/structured.py)
    response_format: dict[str, Any] | None = Field(None, description="{'type': 'text' | 'json_object' | "
                                                   "'json_schema', 'json_schema': {'name': ..., 'schema': {...}}}")
    structured_outputs: dict[str, Any] | None = Field(None, description="vLLM's: one of json, json_object, regex, "
                                                      "choice, grammar.")
    guided_json: Any = Field(None, description="vLLM's older name of structured_outputs.json.")
    guided_regex: str | None = Field(None, description="vLLM's older name of structured_outputs.regex.")
    guided_choice: list[str] | None = Field(None, description="vLLM's older name of structured_outputs.choice.")
    guided_grammar: str | None = Field(None, description="vLLM's older name of structured_outputs.grammar.")
    priority: int = Field(0, ge=-2**31, le=2**31 - 1,
                          description="Lower runs first under --scheduling-policy priority (int32).")
    request_id: str | None = Field(None, description="Used in the response id; random when unset.")


class PromptTokensDetails(OpenAIModel):
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache (the prefill worker's, disaggregated)


class CompletionTokensDetails(OpenAIModel):
    reasoning_tokens: int = 0  # output tokens of the reply's think block, its tags included


class UsageInfo(OpenAIModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None
    completion_tokens_details: CompletionTokensDetails | None = None  # with --reasoning-parser


# ---- completions -----------------------------------------------------------------------------------


class CompletionRequest(SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    suffix: str | None = Field(None, description="Not supported: must be null.")
    max_tokens: int | None = Field(16, ge=1, description="null: up to the context length.")
    best_of: int | None = Field(None, ge=1, le=MAX_N)
    logprobs: int | None = Field(None, ge=0, description="Top logprobs per token (at most --max-logprobs).")
    echo: bool = False
    add_special_tokens: bool = True
    prompt_logprobs: int | None = Field(None, ge=0)


class CompletionLogProbs(OpenAIModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionChoice(OpenAIModel):
    index: int
    text: str
    logprobs: CompletionLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prompt_logprobs: list[dict[str, Any] | None] | None = None


class CompletionResponse(OpenAIModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo


# ---- chat ------------------------------------------------------------------------------------------


class ContentPart(OpenAIModel):
    model_config = ConfigDict(extra="allow")
    type: str = Field(description="Only 'text' parts are supported.")
    text: str | None = None


class ChatMessage(OpenAIModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, description="Deprecated by OpenAI: max_completion_tokens.")
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0)
    tools: list[dict[str, Any]] | None = Field(None, description="Given to the chat template.")
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = Field(
        None, description='"required" or {"type": "function", "function": {"name": ...}} forces tool calls; '
                          '"auto" (the default with tools) parses the calls the model writes itself.')
    # vLLM extras
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    add_special_tokens: bool = False


class TopLogprob(OpenAIModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(OpenAIModel):
    content: list[TokenLogprob] | None = None


class ResponseMessage(OpenAIModel):
    role: str
    content: str | None = None
    tool_calls: list[dict[str, Any]] = Field(default_factory=list)
    reasoning: str | None = None  # --reasoning-parser: the reply's <think> part (vLLM's current field)
    reasoning_content: str | None = None  # the same text under its older name (DeepSeek's API, many clients)


class ChatChoice(OpenAIModel):
    index: int
    message: ResponseMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(OpenAIModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo


# ---- models, tokenizer, errors --------------------------------------------------------------------


class ModelCard(OpenAIModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "tandem"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None


class ModelList(OpenAIModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class LoadLoRAAdapterRequest(OpenAIModel):
    lora_name: str = Field(min_length=1, pattern=r"^\S+$")
    lora_path: str = Field(min_length=1)


class UnloadLoRAAdapterRequest(OpenAIModel):
    lora_name: str = Field(min_length=1)
    lora_int_id: int | None = None  # vLLM's; names identify adapters here


class TokenizeRequest(OpenAIModel):
    """Either `prompt` (text) or `messages` (a chat, through the chat template)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = Field(None, description="Default: true for prompt, false for messages.")
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: bool = False


class TokenizeResponse(OpenAIModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(OpenAIModel):
    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(OpenAIModel):
    prompt: str


class VersionResponse(OpenAIModel):
    version: str


class ErrorInfo(OpenAIModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(OpenAIModel):
    error: ErrorInfo
