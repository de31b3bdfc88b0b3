"""What the engine hands back to callers (offline `LLM` and `AsyncEngine`).

Outputs are cumulative: each `RequestOutput` for a request carries the whole
text / token ids / logprobs generated so far (callers diff for streaming).
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Logprob:
    logprob: float
    rank: int  # 1 = most likely
    decoded_token: str


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    # One dict per generated token: token id -> Logprob (sampled token + top-n).
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None while running
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics | None = None
    num_cached_tokens: int = 0


@dataclass(frozen=True)
class FinishedRequestStats:
    finish_reason: str
    num_prompt_tokens: int
    num_generation_tokens: int
    e2e_latency: float
    queue_time: float


@dataclass(frozen=True)
class StepStats:
    """One engine step's figures; metrics are updated from these only."""
    num_running: int
    num_waiting: int
    kv_cache_usage: float  # 0..1, blocks in use / total
    num_prompt_tokens: int  # prompt tokens computed this step (prefill)
    num_generation_tokens: int  # tokens sampled this step
    num_preemptions: int
    prefix_cache_queries: int  # tokens looked up at admission this step
    prefix_cache_hits: int  # of which found cached
    time_to_first_tokens: list[float] = field(default_factory=list)
    inter_token_latencies: list[float] = field(default_factory=list)
    finished: list[FinishedRequestStats] = field(default_factory=list)
    num_aborted: int = 0
