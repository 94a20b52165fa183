"""OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}` for every failure.

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
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        if not errors:
            return bad_request("invalid request body").response()
        message, param = _describe(errors[0])
        others = {_describe(e)[1] for e in errors[1:]} - {param}
        if others:  # several members of one union failing is one problem, not several
            message += f" (also invalid: {', '.join(sorted(str(o) for o in others))})"
        return bad_request(message, param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        err = APIError(exc.status_code, str(exc.detail))
        return SafeJSONResponse(err.body(), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return server_error(f"internal server error: {type(exc).__name__}").response()
