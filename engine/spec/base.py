"""Drafter ABC + registry.

A drafter proposes up to k next tokens for a running request from what it has
seen. It owns its per-request state, keyed by request id, and must drop it in
`forget`. `propose` runs on the engine thread before scheduling; it must be
cheap relative to a model step (pure CPU for `ngram`).

Deterministic drafters (q is one-hot on the proposed token) are verified by
`engine.spec.verify.accept_drafts`: a draft is kept iff it equals the target's
own sample at its position, which is lossless and, with keyed noise, gives the
non-speculative output for every k.
"""
from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

_REGISTRY: dict[str, type["Drafter"]] = {}


@dataclass(frozen=True)
class Proposal:
    """A request's drafts: a chain, or a tree when `parents` is set (engine/spec/tree.py).
    `gains[i]`, when set, is the drafter's estimate of P(draft i is accepted); drafts
    are then in decreasing gain order (so every prefix is the best tree of its size).
    `source`, when set, names what the drafts were drawn from (`ngram`: the length of the
    suffix match); the controller keeps a first-draft acceptance rate per source."""
    drafts: list[int]
    parents: list[int] | None = None
    gains: list[float] | None = None
    source: int | None = None

    def chain_prefix(self) -> list[int]:
        """The drafts up to the first one that does not follow its predecessor."""
        if self.parents is None:
            return self.drafts
        n = next((i for i, p in enumerate(self.parents) if p != i - 1), len(self.parents))
        return self.drafts[:n]


class Drafter(abc.ABC):
    name: str = ""
    deterministic: bool = True  # q one-hot: exact-match verification applies
    needs_runner: bool = False  # drafts inside the runner's step (engine.spec.model_drafter)
    logit_topk: int = 0  # > 0: `learn` gets the top ids of every sampled row's logits
    keeps_kv: bool = False  # has its own KV per request, which must catch up (`backlog`)

    @abc.abstractmethod
    def propose(self, request_id: str, token_ids: Sequence[int], k: int) -> list[int]:
        """Up to k draft tokens to follow `token_ids` (the request's committed tokens)."""

    def propose_tree(self, request_id: str, token_ids: Sequence[int], k: int) -> Proposal:
        """Up to k drafts, as a chain unless the drafter builds trees."""
        return Proposal(self.propose(request_id, token_ids, k))

    def learn(self, committed: Sequence[tuple[Sequence[int], int]],
              logit_topk: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        """After a step: (token ids, how many are new) of each request that committed
        tokens, and the step's (input token [S], top ids [S, K]) of its sampled rows."""

    def backlog(self, request_id: str, num_computed_tokens: int) -> int:
        """Committed tokens this drafter must still process before it can draft for the
        request (a draft model's KV catching up on the prompt and on tokens committed
        while it did not draft); 0 for drafters without per-request model state."""
        return 0

    def forget(self, request_id: str) -> None:
        """The request finished or was aborted: drop its state."""

    def preempted(self, request_id: str) -> None:
        """The request was preempted: its KV blocks went back to the pool and the target
        will recompute it. A drafter whose KV lives in those blocks drops what it knew of it."""


def register_drafter(name: str) -> Callable[[type], type]:
    def wrap(cls: type) -> type:
        cls.name = name
        _REGISTRY[name] = cls
        return cls
    return wrap


def _register_builtins() -> None:
    import engine.spec.model_drafter  # noqa: F401  (layerskip, draft)
    import engine.spec.ngram  # noqa: F401
    import engine.spec.recycling  # noqa: F401


def create_drafter(name: str, **kwargs: Any) -> Drafter:
    _register_builtins()

    if name not in _REGISTRY:
        raise ValueError(f"unknown speculative method {name!r}; known: {sorted(_REGISTRY)}")
    return _REGISTRY[name](**kwargs)


def drafter_names() -> list[str]:
    _register_builtins()

    return sorted(_REGISTRY)
