"""The llguidance grammar backend (PyPI `llguidance`): JSON Schema, regex, choice, Lark.

Compilation builds one template `LLMatcher` per grammar (lexer and parser
tables; this is the expensive part, and it runs with the GIL released); each
sequence's matcher is a `deep_copy` of it. Mask computation per step is
bounded by `LIMITS` (llguidance's parser and lexer fuel), so a hostile schema
makes its own matcher fail, never stalls the step. Bitmask rows use
llguidance's layout: int32 words, bit t % 32 of word t // 32 = token t.
"""
from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from engine.structured.backend import (CompiledGrammar, GrammarBackend, GrammarError,
                                       GrammarMatcher, bitmask_width, register_backend)
from engine.structured.params import StructuredOutputsParams
from engine.structured.schema_strict import close_objects

# llguidance's own defaults, spelled out: ~4 ms of Earley items and ~14 ms of lexer
# work per mask at most; grammars beyond these sizes are refused at compile time.
LIMITS = dict(step_max_items=50_000, step_lexer_fuel=200_000, initial_lexer_fuel=1_000_000,
              max_lexer_states=250_000, max_grammar_size=500_000, max_items_in_row=2000)


def _check_json_schema(schema: Any) -> None:
    """Refuse what is not a JSON Schema at all (by the schema's own $schema draft)."""
    import warnings

    import jsonschema

    try:
        with warnings.catch_warnings():  # an unknown $schema falls back to the latest draft
            warnings.simplefilter("ignore", DeprecationWarning)
            validator = jsonschema.validators.validator_for(schema, jsonschema.Draft202012Validator)
        validator.check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise GrammarError(f"not a valid JSON Schema: {exc.message}") from None


def grammar_text(spec: StructuredOutputsParams) -> str:
    """The llguidance grammar (its JSON form) for a spec."""
    import llguidance

    options = {"whitespace_flexible": spec.whitespace_flexible}
    if spec.json is not None:
        schema = json.loads(spec.schema_text())
        _check_json_schema(schema)
        if not spec.allow_additional_properties:
            schema = close_objects(schema)
        try:
            return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=options)
        except ValueError as exc:
            raise GrammarError(str(exc)) from None
    if spec.json_object:
        return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=options)
    if spec.regex is not None:
        return llguidance.LLMatcher.grammar_from_regex(spec.regex)
    if spec.choice is not None:
        return llguidance.LLMatcher.grammar_from_regex("|".join(f"(?:{re.escape(c)})" for c in spec.choice))
    return llguidance.LLMatcher.grammar_from_lark(spec.grammar)


class _Compiled(CompiledGrammar):
    def __init__(self, template: Any, backend: "LLGuidanceBackend"):
        self._template = template
        self._backend = backend

    def new_matcher(self) -> GrammarMatcher:
        b = self._backend
        return LLGuidanceMatcher(self._template.deep_copy(), b.width, b.eos, b.executor)


class LLGuidanceMatcher(GrammarMatcher):
    def __init__(self, matcher: Any, width: int, eos: int, executor: Any):
        self.m = matcher
        self.width = width
        self.eos = eos
        self.executor = executor
        self._probe = torch.empty((1, width), dtype=torch.int32)  # forced_tokens' scratch row

    def _fill_row(self, row: torch.Tensor) -> None:
        self.m.unsafe_compute_mask_ptr(row.data_ptr(), self.width * 4)

    def fill_bitmask(self, rows: torch.Tensor, draft: Sequence[int] = ()) -> None:
        assert rows.dtype == torch.int32 and rows.is_contiguous() and rows.shape[0] == 1 + len(draft)
        self._fill_row(rows[0])
        consumed = 0
        for i, token in enumerate(draft):
            if self.m.validate_tokens([int(token)]) != 1:
                rows[i + 1:].fill_(-1)  # positions after a rejected draft token are never used
                break
            self.m.consume_token(int(token))
            consumed += 1
            self._fill_row(rows[i + 1])
        if consumed:
            self.m.rollback(consumed)

    def validate_tokens(self, tokens: Sequence[int]) -> int:
        return self.m.validate_tokens([int(t) for t in tokens])

    def accept(self, tokens: Sequence[int]) -> bool:
        return self.m.consume_tokens([int(t) for t in tokens]) if tokens else True

    def rollback(self, num_tokens: int) -> None:
        if num_tokens:
            self.m.rollback(num_tokens)

    def sole_allowed(self) -> int | None:
        """The token id when exactly one token is allowed next, else None."""
        self._fill_row(self._probe[0])
        words = self._probe[0].numpy().view(np.uint32)
        nonzero = np.flatnonzero(words)
        if len(nonzero) != 1:
            return None
        word = int(words[nonzero[0]])
        if word & (word - 1):
            return None
        return int(nonzero[0]) * 32 + word.bit_length() - 1

    def forced_tokens(self, limit: int) -> list[int]:
        """Only candidates llguidance sees as forced are probed (one mask each), so the
        common unforced position costs one cheap call."""
        out: list[int] = []
        while len(out) < limit and not self.m.is_stopped():
            candidates = self.m.compute_ff_tokens()
            if not candidates:
                break
            progressed = False
            for token in candidates[:limit - len(out)]:
                # validate too: llguidance's mask can allow a token its parser then refuses
                if self.sole_allowed() != token or token == self.eos or self.m.validate_tokens([token]) != 1:
                    break
                self.m.consume_token(token)
                out.append(token)
                progressed = True
            if not progressed or len(out) >= limit:
                break
        self.rollback(len(out))
        return out

    @classmethod
    def fill_many(cls, matchers: Sequence[GrammarMatcher], bitmask: torch.Tensor) -> None:
        """All rows at once on llguidance's thread pool (the GIL is released)."""
        assert bitmask.dtype == torch.int32 and bitmask.is_contiguous()
        pairs = [(m.m, i) for i, m in enumerate(matchers)]
        width = matchers[0].width
        matchers[0].executor.unsafe_compute_mask_ptr(pairs, bitmask.data_ptr(), width * 4, bitmask.shape[0])

    def is_terminated(self) -> bool:
        return self.m.is_stopped() and not self.m.is_error()

    def is_accepting(self) -> bool:
        return self.m.is_accepting()

    def error(self) -> str | None:
        return (self.m.get_error() or "grammar error") if self.m.is_error() else None


@register_backend("llguidance")
class LLGuidanceBackend(GrammarBackend):
    def __init__(self, tokenizer: Any, vocab_size: int):
        import llguidance
        import llguidance.hf

        self._llg = llguidance
        eos = tokenizer.eos_token_id
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=eos)
        self.eos = self.tokenizer.eos_token
        self.width = bitmask_width(vocab_size)
        self.executor = llguidance.LLExecutor()

    def _limits(self) -> Any:
        return self._llg.LLParserLimits(**LIMITS)

    def compile(self, spec: StructuredOutputsParams) -> CompiledGrammar:
        grammar = grammar_text(spec)
        matcher = self._llg.LLMatcher(self.tokenizer, grammar, log_level=0, limits=self._limits())
        if matcher.is_error():
            raise GrammarError(matcher.get_error())
        return _Compiled(matcher, self)
