"""Public API of the engine: the only names the server (and users) import."""
from engine.config import DEFAULT_MODEL, EngineArgs
from engine.errors import (ContextLengthError, EngineError, EngineOverloadedError, ParamError,
                           UnsupportedModelError)
from engine.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput, StepStats
from engine.sampling_params import SamplingParams


def __getattr__(name):  # heavy modules (torch) load on first use
    if name == "LLM":
        from engine.llm import LLM
        return LLM
    if name == "AsyncEngine":
        from engine.async_engine import AsyncEngine
        return AsyncEngine
    raise AttributeError(name)


__all__ = ["LLM", "AsyncEngine", "EngineArgs", "SamplingParams", "RequestOutput", "CompletionOutput",
           "Logprob", "RequestMetrics", "StepStats", "ParamError", "ContextLengthError", "EngineError",
           "EngineOverloadedError", "UnsupportedModelError", "DEFAULT_MODEL"]
