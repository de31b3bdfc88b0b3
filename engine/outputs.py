"""What the engine hands back to callers (offline `LLM` and `AsyncEngine`).

`RequestOutput.kind` says what an output carries (`SamplingParams.output_kind`):
  * DELTA: the text, token ids and logprobs produced since the previous output
    of the same request (streams); `merge` folds a later delta into an earlier
    one, so a slow consumer holds one pending output per request, not a queue;
  * FINAL: one output per request, when it finishes, with everything.
Either way the engine never copies a request's whole history per step.
A request that failed has `error` set and its unfinished completions end
with finish_reason "error".
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from engine.sampling_params import OutputKind


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
    cumulative_logprob: float | None  # over every kept token so far (not only this delta)
    # One dict per token in `token_ids`: token id -> Logprob (sampled token + top-n).
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error" | None while running
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def merge(self, later: "CompletionOutput") -> None:
        """Append a later delta of the same completion."""
        self.text += later.text
        self.token_ids.extend(later.token_ids)
        if later.logprobs is not None:
            self.logprobs = (self.logprobs or []) + later.logprobs
        self.cumulative_logprob = later.cumulative_logprob
        self.finish_reason, self.stop_reason = later.finish_reason, later.stop_reason


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
    kind: OutputKind = OutputKind.FINAL
    error: str | None = None  # set when the request failed inside the engine
    # Set with `error` when the failure is the request's own input: its output constraint
    # (the field it came from) cannot be followed. None: an engine-side fault.
    error_param: str | None = None

    def merge(self, later: "RequestOutput") -> None:
        """Fold a later DELTA output of the same request into this one."""
        by_index = {c.index: c for c in self.outputs}
        for comp in later.outputs:
            if comp.index in by_index:
                by_index[comp.index].merge(comp)
            else:
                self.outputs.append(comp)
        self.finished, self.metrics, self.error = later.finished, later.metrics, later.error
        self.error_param = later.error_param
        self.num_cached_tokens = later.num_cached_tokens


@dataclass(frozen=True)
class FinishedRequestStats:
    finish_reason: str
    num_prompt_tokens: int
    num_generation_tokens: int
    e2e_latency: float
    queue_time: float
    time_per_output_token: float | None = None  # (last - first token) / (n - 1); None for n < 2


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
    structured_requests: list[str] = field(default_factory=list)  # kinds of constrained requests added
    num_fast_forward_tokens: int = 0  # tokens appended without sampling (sole allowed by a grammar)
    step_duration: float = 0.0  # seconds from schedule() to outputs ready; 0 for an empty step
    batch_size: int = 0  # sequences computed this step (prefill chunks and decodes)
    spec: Any = None  # engine.spec.decoder.SpecStats of this step when speculation is on
    shared_prefix_groups: int = 0  # shared-prefix levels whose attention was decomposed this step
    shared_prefix_tokens: int = 0  # member x prefix tokens attended through a shared KV read
