"""Engine errors -> OpenAI error bodies and HTTP status codes.

Every error leaving the server has the shape
`{"error": {"message", "type", "param", "code"}}`; no stack trace ever reaches
a client (it goes to the log instead).
"""
from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine.errors import (ContextLengthError, EngineDeadError, EngineError, EngineOverloadedError,
                           ParamError, RequestFailedError)

logger = logging.getLogger("strix.server")

INVALID_REQUEST = "invalid_request_error"
SERVER_ERROR = "server_error"
RETRY_AFTER_S = 1


class APIError(Exception):
    """An error with an OpenAI-shaped body; raise it anywhere in a handler."""

    def __init__(self, status: int, message: str, *, type: str = INVALID_REQUEST,
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def error_body(message: str, type: str = INVALID_REQUEST, param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def payload_too_large(limit: int) -> APIError:
    return APIError(413, f"The request body is larger than {limit} bytes.",
                    code="request_too_large")


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def model_not_found(model: str) -> APIError:
    return APIError(404, f"The model `{model}` does not exist.", param="model",
                    code="model_not_found")


def from_exception(exc: BaseException) -> APIError:
    """Map anything a request can raise to the error the client should see."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ContextLengthError):
        return APIError(400, str(exc), param=exc.param or "messages",
                        code="context_length_exceeded")
    if isinstance(exc, ParamError):
        return APIError(400, str(exc), param=exc.param)
    if isinstance(exc, EngineOverloadedError):
        return APIError(503, "The server is overloaded: too many requests are waiting. "
                        "Retry later.", type=SERVER_ERROR, code="engine_overloaded",
                        headers={"Retry-After": str(RETRY_AFTER_S)})
    if isinstance(exc, RequestFailedError) and exc.param:
        return APIError(400, f"The request failed: {exc}", param=exc.param, code="constraint_failed")
    if isinstance(exc, RequestFailedError):
        return APIError(500, f"The request failed inside the engine ({exc}); other requests "
                        "were not affected. Retry it.", type=SERVER_ERROR, code="request_failed")
    if isinstance(exc, EngineDeadError):
        return APIError(500, "The engine failed while serving this request; the server is "
                        "restarting. Retry later.", type=SERVER_ERROR, code="engine_dead")
    if isinstance(exc, EngineError):
        return APIError(503, "The engine is not available.", type=SERVER_ERROR,
                        code="engine_unavailable")
    logger.error("unexpected error while serving a request", exc_info=exc)
    return APIError(500, "Internal server error.", type=SERVER_ERROR)


_UNION_TAGS = {"str", "int", "float", "bool", "list", "dict", "tuple", "set", "none"}


def _param_from_loc(loc: tuple[Any, ...]) -> str | None:
    """('body', 'messages', 0, 'content') -> 'messages[0].content'.

    pydantic puts union member names ('str', 'list[int]', 'ContentPart') into
    locations; they are not fields and are dropped.
    """
    parts = list(loc[1:] if loc and loc[0] in ("body", "query", "path") else loc)
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and part.isidentifier() and part not in _UNION_TAGS \
                and not part[0].isupper():
            out += f".{part}" if out else part
    return out or None


def _validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    if not errors:
        return bad_request("Invalid request.")
    first = errors[0]
    if first.get("type") == "json_invalid":
        return bad_request("The request body is not valid JSON.")
    if first.get("loc") == ("body",) and first.get("type") in ("missing", "model_attributes_type"):
        return bad_request("The request body must be a JSON object.")
    param = _param_from_loc(tuple(first.get("loc", ())))
    where = f" (param `{param}`)" if param else ""
    message = f"{first.get('msg', 'Invalid value')}{where}"
    if len(errors) > 1:
        message += f"; and {len(errors) - 1} more error(s)"
    return bad_request(message, param=param)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = INVALID_REQUEST if exc.status_code < 500 else SERVER_ERROR
        message = exc.detail if isinstance(exc.detail, str) else "HTTP error"
        code = "not_found" if exc.status_code == 404 else None
        return JSONResponse(error_body(message, kind, None, code), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    # Engine-side outcomes of one request: answered here (the catch-all below runs in
    # Starlette's outermost middleware, which re-raises and drops the connection).
    @app.exception_handler(RequestFailedError)
    async def _failed(_: Request, exc: RequestFailedError) -> JSONResponse:
        return from_exception(exc).response()

    @app.exception_handler(EngineError)
    async def _engine(_: Request, exc: EngineError) -> JSONResponse:
        return from_exception(exc).response()

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        return from_exception(exc).response()
