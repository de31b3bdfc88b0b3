"""Request: one sequence's token ids and progress. Pure Python, no tensors.

Invariant: `num_computed_tokens` (tokens whose KV is in the cache) only grows,
except on preemption (reset to 0) and on rejected speculative tokens (rolled
back). Every step the scheduler moves it toward `num_tokens`; a token is
sampled when it reaches `num_tokens`.
"""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

from engine.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"

    def __str__(self) -> str:
        return self.value


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    eos_token_ids: tuple[int, ...] = ()
    arrival_time: float = field(default_factory=time.monotonic)
    priority: int = 0  # lower is served first, then FCFS
    # A sibling (same prompt, n > 1) whose prompt blocks this request should reuse:
    # it is admitted only once the leader's prompt is in the cache.
    prefix_leader: "Request | None" = None
    seed: int | None = None  # seeded sampling: token i's noise is keyed by (seed, i)
    # GrammarMatcher of a constrained request: it has accepted exactly the kept output tokens.
    matcher: Any = None
    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache at first admission
    num_preemptions: int = 0
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    # Speculative tokens proposed for the next step (outside token_ids: committed tokens only);
    # written by the engine's speculative decoder before each schedule().
    draft_token_ids: list[int] = field(default_factory=list)
    # Parent of each draft when they form a tree (engine/spec/tree.py: -1 = the last
    # committed token); empty = a chain. Same writer as draft_token_ids.
    draft_parents: list[int] = field(default_factory=list)
    # Chained prefix-cache keys of this request's full blocks, filled lazily by the KV manager.
    block_hashes: list[bytes] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.token_ids: list[int] = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def budget_left(self) -> int | None:
        """Output tokens max_tokens still allows (None: no max_tokens)."""
        return None if self.params.max_tokens is None else self.params.max_tokens - self.num_output_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def append_output(self, token_ids: list[int]) -> None:
        self.output_token_ids.extend(token_ids)
        self.token_ids.extend(token_ids)

    def truncate_output(self, num_output_tokens: int) -> None:
        """Drop output tokens past `num_output_tokens` (stop string inside a multi-token step)."""
        drop = self.num_output_tokens - num_output_tokens
        if drop > 0:
            del self.output_token_ids[num_output_tokens:]
            del self.token_ids[self.num_tokens - drop:]
            self.num_computed_tokens = min(self.num_computed_tokens, self.num_tokens)
