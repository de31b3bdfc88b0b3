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
from typing import Any

_REGISTRY: dict[str, type["Drafter"]] = {}


class Drafter(abc.ABC):
    name: str = ""
    deterministic: bool = True  # q one-hot: exact-match verification applies
    needs_runner: bool = False  # drafts inside the runner's step (engine.spec.model_drafter)

    @abc.abstractmethod
    def propose(self, request_id: str, token_ids: Sequence[int], k: int) -> list[int]:
        """Up to k draft tokens to follow `token_ids` (the request's committed tokens)."""

    def forget(self, request_id: str) -> None:
        """The request finished or was aborted: drop its state."""


def register_drafter(name: str) -> Callable[[type], type]:
    def wrap(cls: type) -> type:
        cls.name = name
        _REGISTRY[name] = cls
        return cls
    return wrap


def _register_builtins() -> None:
    import engine.spec.model_drafter  # noqa: F401  (layerskip, draft)
    import engine.spec.ngram  # noqa: F401


def create_drafter(name: str, **kwargs: Any) -> Drafter:
    _register_builtins()

    if name not in _REGISTRY:
        raise ValueError(f"unknown speculative method {name!r}; known: {sorted(_REGISTRY)}")
    return _REGISTRY[name](**kwargs)


def drafter_names() -> list[str]:
    _register_builtins()

    return sorted(_REGISTRY)
