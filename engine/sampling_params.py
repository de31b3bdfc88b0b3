"""SamplingParams: what a caller may ask of one request's decoding.

Every check that needs no model lives here (types, ranges, NaN/inf, list and
string sizes, unencodable strings); checks that need the model (token ids in
the vocabulary, lengths against the context) are `EngineCore.validate`'s.
Validation raises `ParamError` (a `ValueError`) whose `param` attribute names
the offending field; the server maps it to an OpenAI-shaped 400.
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine.structured.params import StructuredOutputsParams

MAX_LOGPROBS = 20
MAX_N = 128
MAX_STOP_STRINGS = 64
MAX_STOP_STRING_CHARS = 1024
MAX_ID_LIST = 4096  # stop_token_ids
MAX_LOGIT_BIAS = 4096
MAX_CACHE_SALT_CHARS = 1024
INT64_MIN, INT64_MAX = -(2 ** 63), 2 ** 63 - 1
MAX_TOKENS_LIMIT = 2 ** 31 - 1  # larger never fits a context; keeps arithmetic in int32/int64


class ParamError(ValueError):
    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class OutputKind(enum.Enum):
    """What each `RequestOutput` of a request carries.

    DELTA: only what is new since the previous output (text, token ids,
    logprobs), one output per step that produced something; for streams.
    FINAL: one output, when the request finishes, with everything; for
    non-streaming responses and offline `LLM.generate`.
    """
    DELTA = "delta"
    FINAL = "final"


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    seed: int | None = None
    max_tokens: int | None = 16  # None: up to the model length
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # None: no logprobs; k: sampled token + top-k
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    # Mixed into the first prefix-cache block key: requests with different salts never
    # share cached KV (tenant isolation). None: the shared, unsalted namespace.
    cache_salt: str | None = None
    output_kind: OutputKind = OutputKind.FINAL
    # Constrain the output to a JSON schema / regex / choice / grammar (engine/structured).
    structured_outputs: "StructuredOutputsParams | None" = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        self.validate()

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5

    def validate(self) -> None:
        self._check_types()
        checks = [
            (1 <= self.n <= MAX_N, "n", f"n must be in [1, {MAX_N}]"),
            (self.temperature >= 0, "temperature", "temperature must be non-negative"),
            (0 < self.top_p <= 1, "top_p", "top_p must be in (0, 1]"),
            (0 <= self.top_k <= INT64_MAX, "top_k", "top_k must be -1 (disabled) or positive"),
            (0 <= self.min_p <= 1, "min_p", "min_p must be in [0, 1]"),
            (-2 <= self.presence_penalty <= 2, "presence_penalty", "presence_penalty must be in [-2, 2]"),
            (-2 <= self.frequency_penalty <= 2, "frequency_penalty", "frequency_penalty must be in [-2, 2]"),
            (self.repetition_penalty > 0, "repetition_penalty", "repetition_penalty must be positive"),
            (self.max_tokens is None or 1 <= self.max_tokens <= MAX_TOKENS_LIMIT, "max_tokens",
             f"max_tokens must be in [1, {MAX_TOKENS_LIMIT}]"),
            (0 <= self.min_tokens <= MAX_TOKENS_LIMIT, "min_tokens", "min_tokens must be non-negative"),
            (self.max_tokens is None or self.min_tokens <= self.max_tokens, "min_tokens",
             "min_tokens must not exceed max_tokens"),
            (self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS, "logprobs",
             f"logprobs must be in [0, {MAX_LOGPROBS}]"),
            (self.seed is None or INT64_MIN <= self.seed <= INT64_MAX - self.n, "seed",
             "seed must fit in a signed 64-bit integer"),
        ]
        for ok, param, message in checks:
            if not ok:
                raise ParamError(message, param)
        self._check_lists()

    def _check_types(self) -> None:
        """Numbers are real numbers (bool is not an int here) and finite."""
        ints = ("n", "top_k", "min_tokens") + tuple(
            name for name in ("max_tokens", "seed", "logprobs") if getattr(self, name) is not None)
        for name in ints:
            if not _is_int(getattr(self, name)):
                raise ParamError(f"{name} must be an integer", name)
        for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty",
                     "repetition_penalty"):
            if not _is_finite(getattr(self, name)):
                raise ParamError(f"{name} must be a finite number", name)
        if not isinstance(self.output_kind, OutputKind):
            raise ParamError("output_kind must be an OutputKind", "output_kind")
        if self.structured_outputs is not None:
            from engine.structured.params import StructuredOutputsParams
            if not isinstance(self.structured_outputs, StructuredOutputsParams):
                raise ParamError("structured_outputs must be a StructuredOutputsParams", "structured_outputs")

    def _check_lists(self) -> None:
        if len(self.stop) > MAX_STOP_STRINGS:
            raise ParamError(f"at most {MAX_STOP_STRINGS} stop strings are allowed", "stop")
        for s in self.stop:
            if not isinstance(s, str) or not s or len(s) > MAX_STOP_STRING_CHARS:
                raise ParamError(f"stop strings must be non-empty strings of at most "
                                 f"{MAX_STOP_STRING_CHARS} characters", "stop")
            check_text(s, "stop")
        if len(self.stop_token_ids) > MAX_ID_LIST:
            raise ParamError(f"at most {MAX_ID_LIST} stop_token_ids are allowed", "stop_token_ids")
        if not all(_is_int(t) and 0 <= t <= INT64_MAX for t in self.stop_token_ids):
            raise ParamError("stop_token_ids must be non-negative integer token ids", "stop_token_ids")
        bias = self.logit_bias or {}
        if len(bias) > MAX_LOGIT_BIAS:
            raise ParamError(f"logit_bias may name at most {MAX_LOGIT_BIAS} tokens", "logit_bias")
        for tok, value in bias.items():
            if not _is_int(tok) or not 0 <= tok <= INT64_MAX:
                raise ParamError("logit_bias keys must be non-negative integer token ids", "logit_bias")
            if not _is_finite(value) or not -100 <= value <= 100:
                raise ParamError(f"logit_bias for token {tok} must be in [-100, 100]", "logit_bias")
        if self.cache_salt is not None:
            if not isinstance(self.cache_salt, str) or not self.cache_salt \
                    or len(self.cache_salt) > MAX_CACHE_SALT_CHARS:
                raise ParamError(f"cache_salt must be a non-empty string of at most "
                                 f"{MAX_CACHE_SALT_CHARS} characters", "cache_salt")
            check_text(self.cache_salt, "cache_salt")


def check_text(text: str, param: str) -> None:
    """Strings must be encodable as UTF-8 (no lone surrogates) and hold no NUL."""
    if "\x00" in text:
        raise ParamError(f"{param} must not contain NUL characters", param)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ParamError(f"{param} is not valid Unicode (lone surrogate)", param) from None


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
