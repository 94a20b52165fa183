"""How the HTTP layer behaves: names, auth, chat templates, CORS. The engine is configured apart."""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from tandem.server.reasoning import REASONING_PARSERS
from tandem.server.tool_parsers import PARSERS

CONTENT_FORMATS = ("auto", "string", "openai")


@dataclass
class ServerConfig:
    served_model_names: list[str] | None = None  # None: the client's model_name; the first is reported
    api_key: str | None = None  # required as a Bearer token on /v1/* when set
    chat_template: str | None = None  # a template (or a path to one) instead of the tokenizer's
    chat_template_content_format: str = "auto"  # how message content reaches the template
    allow_runtime_lora_updating: bool = False  # POST /v1/load_lora_adapter and /v1/unload_lora_adapter
    tool_call_parser: str = "auto"  # the model's own tool-call syntax (tool_parsers.py); auto: read the template
    reasoning_parser: str | None = None  # deepseek_r1 / qwen3: split the reply's <think> part off (reasoning.py)
    response_role: str = "assistant"
    max_logprobs: int = 20  # most logprobs / top_logprobs a request may ask for
    max_seqs_per_request: int = 256  # prompts x best_of, so one request cannot exhaust memory
    responses_store_size: int = 1024  # Responses API: stored responses kept (LRU) for previous_response_id; 0: none
    disable_log_requests: bool = False
    enable_request_id_headers: bool = False
    allowed_origins: list[str] = field(default_factory=lambda: ["*"])
    allowed_methods: list[str] = field(default_factory=lambda: ["*"])
    allowed_headers: list[str] = field(default_factory=lambda: ["*"])
    allow_credentials: bool = False

    def __post_init__(self) -> None:
        if self.chat_template_content_format not in CONTENT_FORMATS:
            raise ValueError(f"chat_template_content_format must be one of {CONTENT_FORMATS}, "
                             f"got {self.chat_template_content_format!r}")
        if self.tool_call_parser not in PARSERS:
            raise ValueError(f"tool_call_parser must be one of {PARSERS}, got {self.tool_call_parser!r}")
        if self.reasoning_parser is not None and self.reasoning_parser not in REASONING_PARSERS:
            raise ValueError(f"reasoning_parser must be one of {REASONING_PARSERS} or None, "
                             f"got {self.reasoning_parser!r}")
        if self.responses_store_size < 0:
            raise ValueError(f"responses_store_size must be >= 0, got {self.responses_store_size}")
        if self.served_model_names is not None and not self.served_model_names:
            raise ValueError("served_model_names must not be empty")
        self.chat_template = load_chat_template(self.chat_template)


def load_chat_template(value: str | None) -> str | None:
    """A path to a template file, or the template itself (recognised by Jinja markup)."""
    if value is None:
        return None
    if os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            return f.read()
    if "{{" in value or "{%" in value:
        return value
    raise ValueError(f"chat template {value!r} is neither a file nor a Jinja template")
