"""RequestGroup: one user request's n sequences, their detokenizers, and its outputs.

The group decides finishes from each step's tokens (stop tokens and strings
through the detokenizer, then max_tokens / the context length) and builds the
request's outputs in its `OutputKind`:
  * DELTA: what each completion gained since the last output (the group keeps
    per-completion offsets of what was already handed out);
  * FINAL: nothing until the group finishes, then everything (the lists are
    handed over, not copied: nothing appends to them afterwards).
Either way no step copies a request's history, so output cost per step is
O(new tokens), not O(tokens so far).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from engine.output import IncrementalDetokenizer
from engine.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from engine.request import Request
from engine.sampling_params import OutputKind, SamplingParams
from engine.structured.backend import GrammarError


@dataclass
class RequestGroup:
    request_id: str
    prompt: str | None
    params: SamplingParams
    arrival_time: float
    seqs: list[Request] = field(default_factory=list)
    detoks: list[IncrementalDetokenizer] = field(default_factory=list)
    cum_logprobs: list[float] = field(default_factory=list)
    sent_text: list[int] = field(default_factory=list)  # DELTA: chars already handed out
    sent_tokens: list[int] = field(default_factory=list)  # DELTA: tokens already handed out
    finished_seqs: set[int] = field(default_factory=set)
    aborted: bool = False  # aborted or failed: finished whatever the sequences say
    error: str | None = None
    error_param: str | None = None  # the request field at fault (a constraint that cannot be followed)

    @property
    def finished(self) -> bool:
        return self.aborted or len(self.finished_seqs) == len(self.seqs)

    def add_seq(self, req: Request, tokenizer: Any, eos_token_ids: tuple[int, ...]) -> None:
        self.seqs.append(req)
        self.detoks.append(IncrementalDetokenizer(tokenizer, req.prompt_token_ids, self.params, eos_token_ids))
        self.cum_logprobs.append(0.0)
        self.sent_text.append(0)
        self.sent_tokens.append(0)

    def append(self, idx: int, req: Request, new_ids: list[int],
               lp_dicts: list[dict[int, Logprob]] | None, max_model_len: int
               ) -> tuple[str | None, int | str | None]:
        """Feed one step's tokens of sequence `idx`; returns (finish reason, stop reason)."""
        detok = self.detoks[idx]
        kept_before = len(detok.token_ids)
        decision = detok.append(new_ids, lp_dicts)
        if detok.logprobs is not None:  # running sum over kept tokens only
            self.cum_logprobs[idx] += sum(d[t].logprob for d, t in zip(detok.logprobs[kept_before:],
                                                                        detok.token_ids[kept_before:]))
        kept = new_ids if decision is None else new_ids[:decision.num_tokens_kept]
        self._advance_grammar(req, kept, finishing=decision is not None)
        if decision is not None:
            req.truncate_output(req.num_output_tokens - len(new_ids) + decision.num_tokens_kept)
            return decision.finish_reason, decision.stop_reason
        if req.matcher is not None and req.matcher.is_terminated():
            return "stop", None  # the structure is complete: nothing may follow (even with ignore_eos)
        if req.num_output_tokens >= req.params.max_tokens or req.num_tokens >= max_model_len:
            return "length", None
        return None, None

    @staticmethod
    def _advance_grammar(req: Request, kept: list[int], finishing: bool) -> None:
        """The matcher advances over kept tokens only (not past a stop string)."""
        if req.matcher is None or not kept:
            return
        if not req.matcher.accept(kept) and not finishing:
            raise GrammarError(req.matcher.error() or f"tokens {kept} are not allowed by the grammar")

    def make_output(self) -> RequestOutput | None:
        """This step's output in the request's kind, or None when it has none to give."""
        delta = self.params.output_kind is OutputKind.DELTA
        if not delta and not self.finished:
            return None
        completions = [self._completion(i, delta) for i in range(len(self.seqs))]
        first = self.seqs[0]
        metrics = RequestMetrics(self.arrival_time, first.first_scheduled_time, first.first_token_time,
                                 first.last_token_time, time.monotonic() if self.finished else None)
        # The prompt ids are never mutated after admission: shared, not copied.
        return RequestOutput(self.request_id, self.prompt, first.prompt_token_ids, completions,
                             self.finished, metrics, first.num_cached_tokens, self.params.output_kind,
                             self.error, self.error_param)

    def _completion(self, i: int, delta: bool) -> CompletionOutput:
        req, detok = self.seqs[i], self.detoks[i]
        reason = req.finish_reason if req.is_finished else None
        text, ids, lps = detok.streamable_text(reason is not None), detok.token_ids, detok.logprobs
        cum = None if lps is None else self.cum_logprobs[i]
        if delta:
            t0, k0 = self.sent_text[i], self.sent_tokens[i]
            self.sent_text[i], self.sent_tokens[i] = len(text), len(ids)
            text, ids, lps = text[t0:], ids[k0:], None if lps is None else lps[k0:]
        return CompletionOutput(i, text, ids, cum, lps, reason, req.stop_reason)
