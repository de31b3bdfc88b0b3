"""Per-sequence output processing: incremental detokenization, stop checks, logprobs.

The engine core owns one `IncrementalDetokenizer` per running sequence and calls
`append` once per step with the token ids sampled for it that step (one, or
several with speculative decoding). The detokenizer keeps the cumulative output
text, decides stop-token / stop-string finishes and tells the core how many of
the step's tokens survive. Length finishes (`max_tokens`) are the core's job.

Incremental detokenization uses the prefix_offset / read_offset technique:

    _ids:            [ prompt context | output ids (minus skipped specials) ]
                              ^prefix_offset        ^read_offset
    delta = decode(_ids[prefix_offset:]) - decode(_ids[prefix_offset:read_offset])

Decoding a short window that starts a few tokens *before* the new tokens keeps
tokenizers that add or strip a leading space (SentencePiece "▁") consistent with
a full decode, and a delta whose decode ends in U+FFFD is held back (offsets not
moved) until the multi-byte UTF-8 character it starts is complete.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

from engine.outputs import Logprob
from engine.sampling_params import SamplingParams

# Prompt tokens used as initial decode context (vLLM uses the same figure).
_CONTEXT_TOKENS = 5
_REPLACEMENT_CHAR = "\ufffd"

# tokenizer -> {cache name -> value}; weak so a dropped tokenizer frees its caches.
_TOKENIZER_CACHES: "weakref.WeakKeyDictionary[Any, dict[str, Any]]" = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class StopDecision:
    """A stop was hit while appending one step's tokens.

    `stop_reason` is the stop string or the stop token id (None for EOS, as in
    vLLM); `num_tokens_kept` is how many of that step's `new_token_ids` were
    kept (the token that triggered the stop included; later ones dropped).
    """
    finish_reason: str
    stop_reason: str | int | None
    num_tokens_kept: int


def _tokenizer_cache(tokenizer: Any, name: str, factory: Callable[[], Any]) -> Any:
    """A per-tokenizer cached value; uncached if the tokenizer is not weak-referenceable."""
    try:
        caches = _TOKENIZER_CACHES.setdefault(tokenizer, {})
    except TypeError:
        return factory()
    if name not in caches:
        caches[name] = factory()
    return caches[name]


def _skipped_special_ids(tokenizer: Any) -> frozenset[int]:
    """Ids that `decode(..., skip_special_tokens=True)` turns into nothing.

    Such generated tokens are left out of the decode window entirely, so a run
    of them (e.g. EOS repeated under ignore_eos) cannot grow the window without
    bound. Each candidate is verified by decoding it, so leaving one out never
    changes the text.
    """
    def compute() -> frozenset[int]:
        candidates = set(getattr(tokenizer, "all_special_ids", None) or ())
        added = getattr(tokenizer, "added_tokens_decoder", None) or {}
        candidates.update(i for i, tok in added.items() if getattr(tok, "special", False))
        return frozenset(i for i in candidates
                         if tokenizer.decode([i], skip_special_tokens=True) == "")
    return _tokenizer_cache(tokenizer, "skipped_special_ids", compute)


def _token_text_cache(tokenizer: Any) -> dict[int, str]:
    # Bounded by the vocabulary size: at most one string per token id.
    return _tokenizer_cache(tokenizer, "token_text", dict)


def make_logprob_dicts(tokenizer: Any, sampled_ids: Sequence[int],
                       sampled_logprobs: Sequence[float], sampled_ranks: Sequence[int],
                       topk_ids: Sequence[Sequence[int]] | None = None,
                       topk_logprobs: Sequence[Sequence[float]] | None = None,
                       ) -> list[dict[int, Logprob]]:
    """One `{token id: Logprob}` dict per sampled token: the sampled token first,
    then the top-k (assumed sorted by descending logprob, so rank = position + 1).

    A sampled token that is also in the top-k keeps its own entry (same numbers).
    `decoded_token` is `tokenizer.decode([id])` with special tokens shown, cached
    per tokenizer so each id is decoded at most once.
    """
    cache = _token_text_cache(tokenizer)

    def text(tok: int) -> str:
        s = cache.get(tok)
        if s is None:
            s = cache[tok] = tokenizer.decode([tok], skip_special_tokens=False) or ""
        return s

    out: list[dict[int, Logprob]] = []
    for i, tok in enumerate(sampled_ids):
        tok = int(tok)
        entry = {tok: Logprob(float(sampled_logprobs[i]), int(sampled_ranks[i]), text(tok))}
        if topk_ids is not None and topk_logprobs is not None:
            for rank, (tid, lp) in enumerate(zip(topk_ids[i], topk_logprobs[i]), start=1):
                tid = int(tid)
                if tid not in entry:
                    entry[tid] = Logprob(float(lp), rank, text(tid))
        out.append(entry)
    return out


class IncrementalDetokenizer:
    """Output text, stop decisions and logprobs of one request sequence.

    Invariants:
    * `token_ids` holds every kept output token, stop token included; `text`
      never includes the text of a stop token (EOS / stop_token_ids).
    * `_ids[_prefix_offset:_read_offset]` decodes to text already in `text`
      (or in the prompt); `_ids[_read_offset:]` has not been emitted yet.
    * Once `stop_decision` is set, nothing more is appended.
    """

    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], params: SamplingParams,
                 eos_token_ids: Sequence[int]):
        self.tokenizer = tokenizer
        self.params = params
        self._skip_special = params.skip_special_tokens
        eos = () if params.ignore_eos else eos_token_ids
        self._eos_ids = frozenset(int(i) for i in eos if i is not None)
        self._stop_ids = frozenset(params.stop_token_ids)
        self._stops = tuple(params.stop)
        self._max_stop_len = max((len(s) for s in self._stops), default=0)
        self._dropped = _skipped_special_ids(tokenizer) if self._skip_special else frozenset()

        # Decode window, seeded with the prompt's tail as context (never emitted).
        self._ids: list[int] = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)

        self.text = ""
        self.token_ids: list[int] = []
        self.logprobs: list[dict[int, Logprob]] | None = [] if params.logprobs is not None else None
        self.stop_decision: StopDecision | None = None

    @property
    def finished(self) -> bool:
        return self.stop_decision is not None

    def append(self, new_token_ids: list[int],
               new_logprobs: list[dict[int, Logprob]] | None = None) -> StopDecision | None:
        """Append one step's tokens; returns a StopDecision if a stop was hit.

        Tokens are processed one at a time so a stop is found at the exact token
        that completes it; the tokens after it in the same step are dropped.
        Calling again after a stop appends nothing and returns the decision
        with `num_tokens_kept=0`.
        """
        if self.stop_decision is not None:
            return replace(self.stop_decision, num_tokens_kept=0)
        for i, tok in enumerate(new_token_ids):
            self.token_ids.append(tok)
            if self.logprobs is not None and new_logprobs is not None:
                self.logprobs.append(new_logprobs[i])
            decision = self._check_stop_token(tok)
            if decision is None:
                decision = self._add_token_text(tok)
            if decision is not None:
                self.stop_decision = replace(decision, num_tokens_kept=i + 1)
                return self.stop_decision
        return None

    def streamable_text(self, finished: bool) -> str:
        """Text safe to show a streaming client now (cumulative; never shrinks).

        While running, a tail of `text` that is a prefix of some stop string is
        held back: if the stop string completes, `text` is truncated before it,
        and the client must not have seen it. Once finished: everything.
        """
        if finished or self.stop_decision is not None or not self._stops:
            return self.text
        return self.text[:len(self.text) - self._held_back_len()]

    # -- internals ---------------------------------------------------------

    def _min_tokens_reached(self) -> bool:
        # Counted after appending the current token (vLLM: output_len >= min_tokens).
        return len(self.token_ids) >= self.params.min_tokens

    def _check_stop_token(self, tok: int) -> StopDecision | None:
        if not self._min_tokens_reached():
            return None
        if tok in self._eos_ids:
            return StopDecision("stop", None, 0)
        if tok in self._stop_ids:
            return StopDecision("stop", tok, 0)
        return None

    def _add_token_text(self, tok: int) -> StopDecision | None:
        """Decode `tok` into `text`, then look for a stop string in what it added."""
        start = len(self.text)
        if tok not in self._dropped:
            self._ids.append(tok)
            self.text += self._decode_delta()
        if not self._stops or len(self.text) == start or not self._min_tokens_reached():
            return None
        return self._check_stop_strings(start)

    def _decode_delta(self) -> str:
        """New complete text of `_ids[_read_offset:]`; moves the offsets when any."""
        ids, skip = self._ids, self._skip_special
        prefix_text = self.tokenizer.decode(ids[self._prefix_offset:self._read_offset],
                                            skip_special_tokens=skip)
        new_text = self.tokenizer.decode(ids[self._prefix_offset:], skip_special_tokens=skip)
        if len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT_CHAR):
            # Nothing visible yet, or a multi-byte character still incomplete:
            # keep the offsets so the next token is decoded together with these.
            return ""
        # The window now starts at a character boundary (the old read offset).
        self._prefix_offset, self._read_offset = self._read_offset, len(ids)
        return new_text[len(prefix_text):]

    def _check_stop_strings(self, start: int) -> StopDecision | None:
        """Find the earliest stop string that ends in `text[start:]` and truncate.

        Each stop `s` is searched from `start - len(s) + 1`, so it must overlap
        the new text: earlier occurrences were already searched (or lay before
        min_tokens was reached, which vLLM also ignores).
        """
        best: tuple[int, str] | None = None
        for s in self._stops:
            idx = self.text.find(s, max(0, start - len(s) + 1))
            if idx != -1 and (best is None or (idx, len(s)) < (best[0], len(best[1]))):
                best = (idx, s)
        if best is None:
            return None
        idx, stop = best
        end = idx + len(stop) if self.params.include_stop_str_in_output else idx
        self.text = self.text[:end]
        return StopDecision("stop", stop, 0)

    def _held_back_len(self) -> int:
        """Length of the longest tail of `text` (< max stop length) that starts a stop string.

        Any stop string completed later must start inside this tail, so what
        precedes it can be streamed without ever being retracted.
        """
        text = self.text
        for k in range(min(self._max_stop_len - 1, len(text)), 0, -1):
            tail = text[-k:]
            if any(s.startswith(tail) for s in self._stops):
                return k
        return 0


__all__ = ["IncrementalDetokenizer", "StopDecision", "make_logprob_dicts"]
