"""Errors the engine raises to callers; the server maps them to OpenAI error bodies."""
from __future__ import annotations

from engine.sampling_params import ParamError


class EngineError(Exception):
    """The engine is not running (shut down or dead): retry elsewhere or later."""


class EngineOverloadedError(EngineError):
    """The waiting queue is full (`max_waiting_requests`); retry later."""


class EngineDeadError(EngineError):
    """The engine thread died while this request was in flight (a bug; the process exits)."""


class RequestFailedError(Exception):
    """This request failed inside the engine (the engine and other requests go on).
    `param` names the request field at fault when the cause is the request's own input
    (an output constraint that cannot be followed)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class RequestFault(Exception):
    """Raised inside a step by a stage that knows which request it was working on;
    the core fails that request alone and retries the step without it."""

    def __init__(self, request_id: str, cause: BaseException):
        super().__init__(f"request {request_id}: {type(cause).__name__}: {cause}")
        self.request_id = request_id
        self.cause = cause


class ContextLengthError(ParamError):
    """Prompt (+ max_tokens) does not fit the model length."""

    code = "context_length_exceeded"


class UnsupportedModelError(ValueError):
    """The model's architecture or configuration is not supported."""


__all__ = ["ParamError", "EngineError", "EngineOverloadedError", "EngineDeadError",
           "RequestFailedError", "RequestFault", "ContextLengthError", "UnsupportedModelError"]
