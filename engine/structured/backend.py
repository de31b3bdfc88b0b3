"""Grammar backend ABC + registry.

A backend compiles a `StructuredOutputsParams` into a `CompiledGrammar`
(expensive, cached and shared) and makes one `GrammarMatcher` per sequence
from it (cheap). A matcher tracks the tokens a sequence has kept and answers
which tokens may come next:

  fill_bitmask(rows, draft)  rows: int32 [1 + len(draft), ceil(V / 32)] CPU tensor;
                             row i = allowed next tokens after draft[:i] (bit t of
                             word t // 32 set = token t allowed). State unchanged.
  validate_tokens(tokens)    how many leading tokens are acceptable; state unchanged
  accept(tokens)             advance over kept tokens; False if one is not allowed
  rollback(n)                undo the last n accepted tokens
  forced_tokens(limit)       tokens the grammar allows alone, position after position
                             (each the only allowed token at its position); state unchanged
  is_terminated()            nothing but the end may follow (the output is complete)
  is_accepting()             the output may end here (more may still follow)
  error()                    why the matcher can go no further (None when healthy)

Backends register by name; `create_backend(name, tokenizer, vocab_size)` makes one.
"""
from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from typing import Any

import torch

from engine.structured.params import StructuredOutputsParams


class GrammarError(ValueError):
    """The backend cannot compile this grammar (unsupported or invalid); the message says why."""


class CompiledGrammar(abc.ABC):
    @abc.abstractmethod
    def new_matcher(self) -> "GrammarMatcher":
        """A fresh matcher at the start of the grammar."""


class GrammarMatcher(abc.ABC):
    @abc.abstractmethod
    def fill_bitmask(self, rows: torch.Tensor, draft: Sequence[int] = ()) -> None: ...

    @abc.abstractmethod
    def validate_tokens(self, tokens: Sequence[int]) -> int: ...

    @abc.abstractmethod
    def accept(self, tokens: Sequence[int]) -> bool: ...

    @abc.abstractmethod
    def rollback(self, num_tokens: int) -> None: ...

    @abc.abstractmethod
    def forced_tokens(self, limit: int) -> list[int]: ...

    @abc.abstractmethod
    def is_terminated(self) -> bool: ...

    @abc.abstractmethod
    def is_accepting(self) -> bool:
        """The tokens so far form a complete output (the end may come now)."""

    @abc.abstractmethod
    def error(self) -> str | None: ...

    @classmethod
    def fill_many(cls, matchers: Sequence["GrammarMatcher"], bitmask: torch.Tensor) -> None:
        """Row i of `bitmask` [len(matchers), W] for matchers[i] (all of this class);
        backends may parallelise."""
        for i, matcher in enumerate(matchers):
            matcher.fill_bitmask(bitmask[i:i + 1])


class GrammarBackend(abc.ABC):
    name: str = ""

    @abc.abstractmethod
    def compile(self, spec: StructuredOutputsParams) -> CompiledGrammar:
        """Raises GrammarError with the backend's reason when it cannot."""


_REGISTRY: dict[str, Callable[..., GrammarBackend]] = {}


def register_backend(name: str) -> Callable[[type], type]:
    def wrap(cls: type) -> type:
        _REGISTRY[name] = cls
        cls.name = name
        return cls
    return wrap


def create_backend(name: str, tokenizer: Any, vocab_size: int) -> GrammarBackend:
    if name not in _REGISTRY:
        from engine.structured import llguidance_backend  # noqa: F401  (registers itself)
    if name not in _REGISTRY:
        raise ValueError(f"unknown grammar backend {name!r}; known: {sorted(_REGISTRY)}")
    return _REGISTRY[name](tokenizer, vocab_size)


def bitmask_width(vocab_size: int) -> int:
    return (vocab_size + 31) // 32
