"""Errors the engine raises to callers; the server maps them to OpenAI error bodies."""
from __future__ import annotations

from engine.sampling_params import ParamError


class EngineError(Exception):
    """The engine failed or is shut down."""


class EngineOverloadedError(EngineError):
    """The waiting queue is full (`max_waiting_requests`); retry later."""


class ContextLengthError(ParamError):
    """Prompt (+ max_tokens) does not fit the model length."""

    code = "context_length_exceeded"


class UnsupportedModelError(ValueError):
    """The model's architecture or configuration is not supported."""


__all__ = ["ParamError", "EngineError", "EngineOverloadedError", "ContextLengthError",
           "UnsupportedModelError"]
