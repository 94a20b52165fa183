"""`tandem serve [MODEL]`: vLLM's flag names, an optional YAML config file, uvicorn.

Precedence: command line > --config file > defaults. The file maps flag names (dashes or
underscores, without the leading `--`) to values; `model` sets the positional argument.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any

from tandem.server.reasoning import REASONING_PARSERS
from tandem.server.tool_parsers import PARSERS

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"  # the served name of the embedded model


def _list(value: str) -> list[str]:
    """A JSON list (vLLM's form: '["http://a", "http://b"]') or comma-separated values."""
    value = value.strip()
    if value.startswith("["):
        items = json.loads(value)
        if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
            raise argparse.ArgumentTypeError(f"expected a JSON list of strings, got {value!r}")
        return items
    return [v.strip() for v in value.split(",") if v.strip()]


def add_serve_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from tandem.cli import _add_engine_args  # the engine flags `generate` and `chat` share

    p = sub.add_parser(
        "serve", help="serve a model over the OpenAI API (like `vllm serve`)",
        description="Start an OpenAI-compatible HTTP server on one colocated engine. Point the official "
                    "`openai` client at http://HOST:PORT/v1. Flags follow vLLM's names.")
    _add_engine_args(p)
    g = p.add_argument_group("engine (more)")
    g.add_argument("--scheduling-policy", choices=["fcfs", "priority", "lof"], default="fcfs",
                   help="fcfs: arrival order; priority: the request's `priority` (lower first), then arrival; "
                        "lof: the largest max_tokens first, prompt work paced into the decode steps (offline "
                        "batches: better throughput, later first tokens) (default: fcfs)")
    g.add_argument("--generation-config", default="auto",
                   help="'auto': defaults from the model's generation_config.json; 'vllm': ignore it; "
                        "or a folder holding a generation_config.json (default: auto)")
    g.add_argument("--seed", type=int, default=0, help="engine random seed (default: 0)")
    add_lora_args(g)
    add_http_args(p)
    p.set_defaults(func=cmd_serve, config_parser=p)
    return p


def add_lora_args(g: argparse._ArgumentGroup) -> None:
    """LoRA flags (vLLM's names), shared by `tandem serve` and the prefill and decode workers."""
    g.add_argument("--lora-modules", nargs="+", type=lora_module, metavar="NAME=PATH",
                   help="LoRA adapters (PEFT folders) to serve, each as a model of its own name: name=path or "
                        'vLLM\'s JSON {"name": ..., "path": ...}')
    g.add_argument("--enable-lora", action="store_true", help="taken for vLLM's sake: --lora-modules enables LoRA")
    g.add_argument("--max-lora-rank", type=int, default=64, help="largest adapter rank accepted (default: 64)")
    g.add_argument("--max-loras", type=int, default=None,
                   help="most adapters the running requests use at once; others wait (default: no limit; every "
                        "adapter stays loaded either way)")


def add_runtime_lora_arg(s: argparse._ArgumentGroup) -> None:
    s.add_argument("--allow-runtime-lora-updating", action="store_true",
                   default=os.environ.get("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "").lower() in ("1", "true"),
                   help="serve POST /v1/load_lora_adapter and /v1/unload_lora_adapter (default: off, or on with "
                        "vLLM's $VLLM_ALLOW_RUNTIME_LORA_UPDATING=true)")


def lora_module(text: str) -> tuple[str, str]:
    """name=path, or vLLM's JSON form {"name": ..., "path": ...}."""
    text = text.strip()
    if text.startswith("{"):
        try:
            value = json.loads(text)
            return str(value["name"]), str(value["path"])
        except (ValueError, KeyError, TypeError) as exc:
            raise argparse.ArgumentTypeError(f'expected {{"name": ..., "path": ...}}, got {text!r}') from exc
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected name=path, got {text!r}")
    return name, path


def port_number(text: str) -> int:
    """A TCP port (0: any free one), checked when the command line is read, not at bind time."""
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 0-65535, got {value}")
    return value


def _boolean(text: str) -> bool:
    if text.lower() in ("true", "yes", "on", "1"):
        return True
    if text.lower() in ("false", "no", "off", "0"):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def add_http_args(p: argparse.ArgumentParser, port: int = 8000) -> None:
    """The OpenAI server's flags (vLLM's names), shared by `tandem serve` and `tandem router`."""
    s = p.add_argument_group("server")
    s.add_argument("--config", metavar="FILE.yaml", help="YAML file of flag values (the command line wins)")
    s.add_argument("--host", default="0.0.0.0", help="address to bind (default: 0.0.0.0)")
    s.add_argument("--port", type=port_number, default=port, help=f"port to bind (default: {port})")
    s.add_argument("--api-key", default=os.environ.get("TANDEM_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $TANDEM_API_KEY, else none)")
    s.add_argument("--served-model-name", nargs="+", metavar="NAME",
                   help="model name(s) clients use; the first is reported (default: the model argument)")
    s.add_argument("--chat-template", help="chat template file or inline Jinja (default: the tokenizer's)")
    s.add_argument("--chat-template-content-format", choices=["auto", "string", "openai"], default="auto",
                   help="message content as a string or as OpenAI's list of parts; auto (the default) "
                        "reads the template")
    s.add_argument("--tool-call-parser", choices=list(PARSERS), default="auto",
                   help="how a model writes its own tool calls (tool_choice auto): hermes (<tool_call> JSON: "
                        "Qwen2/2.5, Hermes), llama3_json (Llama 3.1+), mistral ([TOOL_CALLS] JSON list), pythonic "
                        "([f(a=1)]: Llama 3.2, Llama 4); auto (the default) reads the chat template; none leaves "
                        "replies as text")
    s.add_argument("--reasoning-parser", choices=list(REASONING_PARSERS), default=None,
                   help="split a reply's <think>...</think> part off as the message's reasoning (and "
                        "reasoning_content): deepseek_r1 (DeepSeek-R1 and its distills, QwQ), qwen3 (Qwen3); "
                        "default: none, the reply stays content")
    add_runtime_lora_arg(s)
    s.add_argument("--response-role", default="assistant", help="role of the generated chat message (default: assistant)")
    s.add_argument("--max-logprobs", type=int, default=20, help="most logprobs a request may ask for (default: 20)")
    s.add_argument("--responses-store-size", type=int, default=1024, metavar="N",
                   help="Responses API: how many responses this process keeps in memory (least recently used out "
                        "first) for previous_response_id and GET /v1/responses/ID; 0 stores none (default: 1024)")
    s.add_argument("--disable-log-requests", action="store_true", help="do not log each request")
    s.add_argument("--enable-request-id-headers", action="store_true",
                   help="echo X-Request-Id (or a generated one) in every response")
    s.add_argument("--allowed-origins", type=_list, default=["*"], help="CORS origins, a JSON list or a,b (default: *)")
    s.add_argument("--allowed-methods", type=_list, default=["*"], help="CORS methods (default: *)")
    s.add_argument("--allowed-headers", type=_list, default=["*"], help="CORS headers (default: *)")
    s.add_argument("--allow-credentials", action="store_true", help="CORS: allow credentials")
    s.add_argument("--uvicorn-log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug", "trace"], help="uvicorn's log level (default: info)")


def server_config(args: argparse.Namespace):
    from tandem.server.config import ServerConfig

    return ServerConfig(
        served_model_names=args.served_model_name, api_key=args.api_key, chat_template=args.chat_template,
        chat_template_content_format=args.chat_template_content_format, tool_call_parser=args.tool_call_parser,
        reasoning_parser=args.reasoning_parser,
        allow_runtime_lora_updating=args.allow_runtime_lora_updating,
        response_role=args.response_role,
        max_logprobs=args.max_logprobs, disable_log_requests=args.disable_log_requests,
        responses_store_size=args.responses_store_size,
        enable_request_id_headers=args.enable_request_id_headers, allowed_origins=args.allowed_origins,
        allowed_methods=args.allowed_methods, allowed_headers=args.allowed_headers,
        allow_credentials=args.allow_credentials)


def apply_config_file(parser: argparse.ArgumentParser, path: str) -> None:
    """Make the file's values the parser's defaults, so the command line still overrides them."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            values = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as exc:
        parser.error(f"cannot read config file {path}: {exc}")
    if not isinstance(values, dict):
        parser.error(f"config file {path} must hold a mapping of flag names to values")
    actions = {a.dest: a for a in parser._actions}
    defaults: dict[str, Any] = {}
    for key, value in values.items():
        dest = str(key).lstrip("-").replace("-", "_")
        if dest not in actions or dest in ("help", "config"):
            parser.error(f"unknown key {key!r} in config file {path}")
        action = actions[dest]
        try:
            if isinstance(value, list) and action.type is _list:
                value = [str(v) for v in value]
            elif isinstance(value, list) and action.nargs == "+" and action.type not in (None, str):
                value = [action.type(v if isinstance(v, str) else json.dumps(v)) for v in value]
            elif isinstance(value, str) and action.nargs == 0:  # a switch: "false" must not read as true
                value = _boolean(value)
            elif action.type is not None and action.type not in (str, _list) and not isinstance(value, (bool, list)):
                value = action.type(str(value))  # checked as on the command line (a port's range, say)
        except (ValueError, argparse.ArgumentTypeError) as exc:
            parser.error(f"{key} in {path}: {exc}")
        if action.choices is not None and value not in action.choices:
            parser.error(f"{key} in {path} must be one of {list(action.choices)}, got {value!r}")
        if dest == "served_model_name" and isinstance(value, str):
            value = [value]
        defaults[dest] = value
    parser.set_defaults(**defaults)


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from tandem.config import EngineConfig
    from tandem.server.api import build_app
    from tandem.server.engine_client import AsyncEngine

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(asctime)s %(name)s: %(message)s")
    log = logging.getLogger("tandem.server")
    try:
        config = server_config(args)
        engine_config = EngineConfig.from_args(args)
        log.info("loading %s", args.model or f"the embedded {DEFAULT_MODEL_NAME}")
        client = AsyncEngine(engine_config, model_name=args.model or DEFAULT_MODEL_NAME)
    except (ValueError, FileNotFoundError) as exc:
        print(f"tandem serve: error: {exc}", file=sys.stderr)
        return 2
    app = build_app(client, config)
    log.info("serving %s (max_model_len %d) on http://%s:%d/v1", app.state.ctx.names[0], client.max_model_len,
             args.host, args.port)
    try:
        # streams still open at Ctrl-C get 10 s, then are cancelled (which aborts their requests)
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.uvicorn_log_level,
                    timeout_keep_alive=30, timeout_graceful_shutdown=10,
                    lifespan="off")  # the app has no lifespan hooks; "on" logs a CancelledError at Ctrl-C
    finally:
        client.shutdown()
    return 0
