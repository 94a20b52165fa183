"""`build_app(client, config)`: the OpenAI-compatible FastAPI application over any EngineClient.

Routes: /v1/models, /v1/completions, /v1/chat/completions, /v1/responses, /v1/messages (Anthropic's),
/tokenize, /detokenize, /health, /version, /metrics. Middleware (pure ASGI, so streams and disconnects pass straight through):
CORS outermost, then X-Request-Id, then the API key on /v1/*.
"""
from __future__ import annotations

import secrets
from typing import Any

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.responses import PlainTextResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tandem import __version__
from tandem.server.config import ServerConfig
from tandem.server.engine_client import EngineClient
from tandem.server.errors import (ANTHROPIC_PATH, APIError, SafeJSONResponse, bad_request, install_error_handlers,
                                  respond, unauthorized)
from tandem.server.metrics import ServerMetrics
from tandem.server.protocol import (ChatCompletionRequest, ChatCompletionResponse, CompletionRequest,
                                    CompletionResponse, DetokenizeRequest, DetokenizeResponse, ErrorResponse,
                                    LoadLoRAAdapterRequest, ModelCard, ModelList, TokenizeRequest, TokenizeResponse,
                                    UnloadLoRAAdapterRequest, VersionResponse)
from tandem.server.serving_chat import ChatServing, render_chat
from tandem.server.serving_common import ServingContext
from tandem.server.serving_completions import CompletionServing
from tandem.server.response_store import ResponseStore
from tandem.server.serving_messages import CountTokensRequest, MessagesRequest, MessagesServing
from tandem.server.serving_responses import ResponsesRequest, ResponsesServing

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": desc} for code, desc in (
        (400, "Invalid request"), (401, "Missing or wrong API key"), (404, "Unknown model"),
        (500, "Engine failure"), (503, "Engine not running"))}


class APIKeyMiddleware:
    """Requires `Authorization: Bearer <key>` on /v1/* (CORS preflights pass: they carry no key); Anthropic's
    routes also take the key as `x-api-key`, as Anthropic's clients send it."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.key = api_key.encode()
        self.expected = b"Bearer " + self.key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] == "http" and scope["method"] != "OPTIONS" and path.startswith("/v1"):
            headers = dict(scope["headers"])
            ok = secrets.compare_digest(headers.get(b"authorization", b""), self.expected)
            if path.startswith(ANTHROPIC_PATH):
                ok = secrets.compare_digest(headers.get(b"x-api-key", b""), self.key) or ok
            if not ok:
                await respond(path, unauthorized())(scope, receive, send)
                return
        await self.app(scope, receive, send)


class RequestIdMiddleware:
    """Echoes X-Request-Id (or a fresh one, which the handlers then use as the response id)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = dict(scope["headers"]).get(b"x-request-id")
        if not rid:
            rid = secrets.token_hex(16).encode()
            scope = {**scope, "headers": [*scope["headers"], (b"x-request-id", rid)]}

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", rid)]}
            await send(message)

        await self.app(scope, receive, send_with_id)


def build_app(client: EngineClient, config: ServerConfig | None = None) -> FastAPI:
    """The API over `client`; the caller owns the client's lifetime (start, shutdown)."""
    config = config or ServerConfig()
    names = list(config.served_model_names or [client.model_name])
    if set(names) & set(client.loras):
        raise ValueError(f"a LoRA adapter may not take a served model's name: {sorted(set(names) & set(client.loras))}")
    ctx = ServingContext(client, config, ServerMetrics(names[0], client.stats), names)
    completions, chat = CompletionServing(ctx), ChatServing(ctx)
    responses = ResponsesServing(chat, ResponseStore(config.responses_store_size))
    messages = MessagesServing(chat)
    app = FastAPI(title="Tandem", version=__version__, default_response_class=SafeJSONResponse,
                  description="OpenAI-compatible LLM serving (vLLM's extra parameters included).")
    app.state.ctx = ctx
    install_error_handlers(app)

    def json(model: Any) -> SafeJSONResponse:
        return SafeJSONResponse(model.model_dump(mode="json"))

    @app.get("/v1/models", response_model=ModelList, responses=_ERRORS, tags=["OpenAI"])
    async def list_models() -> Response:
        models = [ModelCard(id=n, root=client.model_path, max_model_len=client.max_model_len) for n in names]
        models += [ModelCard(id=name, root=path, parent=names[0], max_model_len=client.max_model_len)
                   for name, path in client.loras.items() if name not in names]  # as vLLM lists adapters
        return json(ModelList(data=models))

    @app.post("/v1/completions", response_model=CompletionResponse, responses=_ERRORS, tags=["OpenAI"])
    async def create_completion(body: CompletionRequest, raw: Request) -> Response:
        """A completion; with `stream: true`, server-sent events ending in `data: [DONE]`."""
        result = await completions.create(body, raw)
        return result if isinstance(result, Response) else json(result)

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=_ERRORS, tags=["OpenAI"])
    async def create_chat_completion(body: ChatCompletionRequest, raw: Request) -> Response:
        """A chat completion; with `stream: true`, server-sent events ending in `data: [DONE]`."""
        result = await chat.create(body, raw)
        return result if isinstance(result, Response) else json(result)

    @app.post("/v1/responses", responses=_ERRORS, tags=["OpenAI"])
    async def create_response(body: ResponsesRequest, raw: Request) -> Response:
        """A response (OpenAI's Responses API; `previous_response_id` continues a stored one); with
        `stream: true`, its typed server-sent events."""
        result = await responses.create(body, raw)
        return result if isinstance(result, Response) else SafeJSONResponse(result)

    @app.get("/v1/responses/{response_id}", responses=_ERRORS, tags=["OpenAI"])
    async def retrieve_response(response_id: str) -> Response:
        """A stored response, as it was returned (or as its stream's last event carried it)."""
        return SafeJSONResponse(responses.store.get(response_id))

    @app.delete("/v1/responses/{response_id}", responses=_ERRORS, tags=["OpenAI"])
    async def delete_response(response_id: str) -> Response:
        """Forget a stored response: it can be neither retrieved nor continued."""
        responses.store.delete(response_id)
        return SafeJSONResponse({"id": response_id, "object": "response.deleted", "deleted": True})

    @app.post("/v1/messages", tags=["Anthropic"])
    async def create_message(body: MessagesRequest, raw: Request) -> Response:
        """A message (Anthropic's Messages API); with `stream: true`, its server-sent events. Errors come in
        Anthropic's shape."""
        result = await messages.create(body, raw)
        return result if isinstance(result, Response) else SafeJSONResponse(result)

    @app.post("/v1/messages/count_tokens", tags=["Anthropic"])
    async def count_message_tokens(body: CountTokensRequest, raw: Request) -> Response:
        """The prompt tokens a message request would take: `{"input_tokens": n}`."""
        return SafeJSONResponse(await messages.count_tokens(body, raw))

    if config.allow_runtime_lora_updating:
        @app.post("/v1/load_lora_adapter", responses=_ERRORS, tags=["vLLM"])
        async def load_lora_adapter(body: LoadLoRAAdapterRequest) -> Response:
            """Load a LoRA adapter (a PEFT folder on the server) as a model of its own name."""
            await _update_loras(lambda: client.load_lora(body.lora_name, body.lora_path), body.lora_name, "lora_path")
            return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

        @app.post("/v1/unload_lora_adapter", responses=_ERRORS, tags=["vLLM"])
        async def unload_lora_adapter(body: UnloadLoRAAdapterRequest) -> Response:
            """Unload a LoRA adapter no request runs under."""
            await _update_loras(lambda: client.unload_lora(body.lora_name), body.lora_name, "lora_name")
            return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    async def _update_loras(update, name: str, param: str) -> None:
        if not hasattr(client, "load_lora"):
            raise bad_request("this gateway loads no adapters itself: start its workers with --lora-modules",
                              "lora_name")
        if name in names:
            raise bad_request(f"{name!r} is a served model's name", "lora_name")
        try:
            await update()
        except ValueError as exc:
            raise bad_request(str(exc), "lora_name" if "already loaded" in str(exc) else param) from exc

    @app.post("/tokenize", response_model=TokenizeResponse, responses=_ERRORS, tags=["vLLM"])
    async def tokenize(body: TokenizeRequest) -> Response:
        ctx.model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise bad_request("give exactly one of prompt and messages", "prompt")
        if body.messages is not None:
            if not body.messages:
                raise bad_request("messages must not be empty", "messages")
            text = render_chat(ctx, body.messages, add_generation_prompt=body.add_generation_prompt,
                               continue_final_message=body.continue_final_message,
                               chat_template=body.chat_template, chat_template_kwargs=body.chat_template_kwargs)
            special = bool(body.add_special_tokens)
        else:
            text, special = body.prompt, body.add_special_tokens is not False
        try:
            ids = client.tokenizer.encode(text, add_special_tokens=special)
        except Exception as exc:  # noqa: BLE001 - e.g. lone surrogates
            raise bad_request(f"text could not be tokenized: {exc}", "prompt") from exc
        strs = client.tokenizer.convert_ids_to_tokens(ids) if body.return_token_strs else None
        return json(TokenizeResponse(count=len(ids), max_model_len=client.max_model_len, tokens=ids, token_strs=strs))

    @app.post("/detokenize", response_model=DetokenizeResponse, responses=_ERRORS, tags=["vLLM"])
    async def detokenize(body: DetokenizeRequest) -> Response:
        ctx.model(body.model)
        vocab = len(client.tokenizer)
        bad = [t for t in body.tokens if not 0 <= t < vocab]
        if bad:
            raise bad_request(f"token ids must be in [0, {vocab}), got {bad[:5]}", "tokens")
        return json(DetokenizeResponse(prompt=client.tokenizer.decode(body.tokens)))

    @app.get("/health", responses={503: _ERRORS[503]}, tags=["Server"])
    async def health() -> Response:
        """200 while the engine runs; 503 once it has died (a restart is needed)."""
        if not client.is_healthy():
            return APIError(503, "the engine is not running").response()
        return Response(status_code=200)

    @app.get("/version", response_model=VersionResponse, tags=["Server"])
    async def version() -> Response:
        return json(VersionResponse(version=__version__))

    @app.get("/metrics", tags=["Server"], response_class=Response)
    async def metrics() -> Response:
        """Prometheus text format, every series named `tandem:*`."""
        return Response(ctx.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    if config.api_key:
        app.add_middleware(APIKeyMiddleware, api_key=config.api_key)
    if config.enable_request_id_headers:
        app.add_middleware(RequestIdMiddleware)
    app.add_middleware(CORSMiddleware, allow_origins=config.allowed_origins, allow_methods=config.allowed_methods,
                       allow_headers=config.allowed_headers, allow_credentials=config.allow_credentials)
    return app
