"""OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}` for every failure; on Anthropic's
routes (/v1/messages...) Anthropic's shape instead: `{"type": "error", "error": {"type", "message"}}`.

FastAPI's 422 validation bodies never reach a client: they become 400s naming the field. Anything
unexpected is a 500 with the same shape (and a logged traceback), never a bare text page.
"""
from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("tandem.server")

_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
          405: "invalid_request_error", 413: "invalid_request_error", 500: "server_error",
          503: "service_unavailable"}


_TAGS = {"str", "int", "float", "bool", "dict", "list", "none"}


class SafeJSONResponse(JSONResponse):
    """JSON that survives lone surrogates (from `\\ud800` escapes in a request echoed back):
    UTF-8 cannot encode them, so such bodies fall back to ASCII escapes."""

    def render(self, content: Any) -> bytes:
        try:
            return json.dumps(content, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        except UnicodeEncodeError:
            return json.dumps(content, separators=(",", ":")).encode("ascii")


class APIError(Exception):
    """An error with its HTTP status and OpenAI error fields."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | int | None = None,
                 type: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)

    def response(self) -> JSONResponse:
        return SafeJSONResponse(self.body(), status_code=self.status)


ANTHROPIC_PATH = "/v1/messages"  # the routes whose clients read Anthropic's error shape
_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                    404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
                    503: "overloaded_error"}


def anthropic_body(err: APIError) -> dict[str, Any]:
    kind = _ANTHROPIC_TYPES.get(err.status, "api_error" if err.status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": err.message}}


def respond(path: str, err: APIError, headers: dict[str, str] | None = None) -> JSONResponse:
    """`err` in the shape the route at `path` answers in."""
    body = anthropic_body(err) if path.startswith(ANTHROPIC_PATH) else err.body()
    return SafeJSONResponse(body, status_code=err.status, headers=headers)


def error_body(message: str, type: str, param: str | None = None, code: str | int | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param, code="invalid_value" if param else None)


def model_not_found(name: str) -> APIError:
    return APIError(404, f"The model `{name}` does not exist.", param="model", code="model_not_found")


def unauthorized() -> APIError:
    return APIError(401, "Incorrect API key provided: pass it as 'Authorization: Bearer <key>'.",
                    code="invalid_api_key")


def server_error(message: str) -> APIError:
    return APIError(500, message, code="internal_error")


def _describe(err: dict[str, Any]) -> tuple[str, str | None]:
    """One pydantic error as (message, param): 'messages.0.role: Input should be ...'."""
    if err.get("type") == "json_invalid":
        return f"the request body is not valid JSON: {err.get('ctx', {}).get('error', err.get('msg'))}", None
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    # union members add their type names to the location; they mean nothing to a client
    loc = [p for i, p in enumerate(loc) if i == 0 or not (any(c in p for c in "[]()") or p in _TAGS)]
    where = ".".join(loc)
    msg = err.get("msg", "invalid value")
    return f"{where or 'request body'}: {msg}", (loc[0] if loc else None)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return respond(request.url.path, exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        if not errors:
            return respond(request.url.path, bad_request("invalid request body"))
        message, param = _describe(errors[0])
        others = {_describe(e)[1] for e in errors[1:]} - {param}
        if others:  # several members of one union failing is one problem, not several
            message += f" (also invalid: {', '.join(sorted(str(o) for o in others))})"
        return respond(request.url.path, bad_request(message, param))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return respond(request.url.path, APIError(exc.status_code, str(exc.detail)), exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return respond(request.url.path, server_error(f"internal server error: {type(exc).__name__}"))
