"""EngineCore.step(): schedule -> execute -> update -> detokenize/stop -> outputs + stats.

Owns the scheduler, the model runner and one detokenizer per sequence. A user
request with n > 1 becomes n sequences (`<id>#<i>`) whose prompt blocks are
shared through the prefix cache; its `RequestOutput` carries all n completions.
Not thread-safe: AsyncEngine drives it from a single thread.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import torch

from engine.errors import ContextLengthError, ParamError
from engine.output import IncrementalDetokenizer, make_logprob_dicts
from engine.outputs import (CompletionOutput, FinishedRequestStats, RequestMetrics, RequestOutput,
                            StepStats)
from engine.request import Request
from engine.sampling_params import SamplingParams
from engine.setup import EngineParts


@dataclass
class _Group:
    """One user request: its n sequences and their detokenizers."""
    request_id: str
    prompt: str | None
    seqs: list[Request]
    detoks: list[IncrementalDetokenizer]
    arrival_time: float
    cum_logprobs: list[float]
    aborted: bool = False
    finished_seqs: set[int] = field(default_factory=set)

    @property
    def finished(self) -> bool:
        return self.aborted or len(self.finished_seqs) == len(self.seqs)


class EngineCore:
    def __init__(self, parts: EngineParts):
        self.parts = parts
        self.tokenizer = parts.tokenizer
        self.scheduler = parts.scheduler
        self.runner = parts.runner
        self.max_model_len = parts.scheduler.config.max_model_len
        self.eos_token_ids = parts.eos_token_ids
        self.groups: dict[str, _Group] = {}
        self.seq_to_group: dict[str, tuple[_Group, int]] = {}
        self._num_aborted = 0
        self._pending_outputs: list[RequestOutput] = []

    # ---- intake ------------------------------------------------------------
    def tokenize(self, prompt: str | list[int]) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        ids = list(prompt)
        vocab = self.parts.model_config.vocab_size
        if any(not isinstance(t, int) or t < 0 or t >= vocab for t in ids):
            raise ParamError(f"prompt token ids must be integers in [0, {vocab})", "prompt")
        return None, ids

    def check_length(self, prompt_ids: list[int], params: SamplingParams) -> None:
        if not prompt_ids:
            raise ParamError("the prompt must contain at least one token", "prompt")
        n, limit = len(prompt_ids), self.max_model_len
        want = n + (params.max_tokens or 1)
        if n >= limit or want > limit:
            raise ContextLengthError(
                f"This model's maximum context length is {limit} tokens. However, you requested {want} tokens "
                f"({n} in the prompt, {params.max_tokens or 1} for the completion). Please reduce the prompt "
                "or max_tokens.", "max_tokens" if n < limit else "prompt")

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                    priority: int = 0, arrival_time: float | None = None, prompt_text: str | None = None) -> None:
        """`prompt` is text or token ids; `prompt_text` names ids already tokenized by the caller."""
        if request_id in self.groups:
            raise ParamError(f"duplicate request id {request_id!r}", "request_id")
        text, prompt_ids = self.tokenize(prompt)
        text = text if text is not None else prompt_text
        self.check_length(prompt_ids, params)
        if params.max_tokens is None:
            params = _with_max_tokens(params, self.max_model_len - len(prompt_ids))
        arrival = arrival_time or time.monotonic()
        group = _Group(request_id, text, [], [], arrival, [0.0] * params.n)
        leader = None
        for i in range(params.n):
            seq_id = request_id if params.n == 1 else f"{request_id}#{i}"
            gen = None
            if params.seed is not None and not params.greedy:
                gen = torch.Generator(device=self.runner.cfg.device).manual_seed(params.seed + i)
            req = Request(seq_id, prompt_ids, params, self.eos_token_ids, arrival_time=arrival,
                          priority=priority, prefix_leader=leader, generator=gen)
            leader = leader or req
            group.seqs.append(req)
            group.detoks.append(IncrementalDetokenizer(self.tokenizer, prompt_ids, params, self.eos_token_ids))
            self.seq_to_group[seq_id] = (group, i)
        self.groups[request_id] = group
        for req in group.seqs:
            self.scheduler.add_request(req)

    def abort(self, request_id: str) -> bool:
        group = self.groups.get(request_id)
        if group is None:
            return False
        group.aborted = True
        for req in group.seqs:
            if self.scheduler.finish_request(req.request_id, "abort") is not None:
                self._num_aborted += 1
        self._pending_outputs.append(self._make_output(group))
        self._forget(group)
        return True

    def has_unfinished(self) -> bool:
        return bool(self.groups) or bool(self._pending_outputs)

    # ---- the step ------------------------------------------------------------
    def step(self) -> tuple[list[RequestOutput], StepStats]:
        outputs, self._pending_outputs = self._pending_outputs, []
        sched = self.scheduler.schedule()
        result = self.runner.execute(sched) if not sched.is_empty else None
        produced = self.scheduler.update(sched, result) if result is not None else []
        now = time.monotonic()
        ttfts, itls, finished = [], [], []
        lp_by_id = dict(zip(result.request_ids, result.logprobs)) if result and result.logprobs else {}
        dirty: dict[str, _Group] = {}
        for req, new_ids in produced:
            group, idx = self.seq_to_group[req.request_id]
            if req.first_token_time is None:
                req.first_token_time = now
                ttfts.append(now - req.arrival_time)
            else:
                itls.extend([(now - req.last_token_time) / len(new_ids)] * len(new_ids))
            req.last_token_time = now
            self._process_tokens(group, idx, req, new_ids, lp_by_id.get(req.request_id), finished)
            dirty[group.request_id] = group
        for group in dirty.values():
            outputs.append(self._make_output(group))
            if group.finished:
                self._forget(group)
        return outputs, self._stats(sched, sum(len(t) for _, t in produced), ttfts, itls, finished)

    def _process_tokens(self, group: _Group, idx: int, req: Request, new_ids: list[int], lps,
                        finished: list[FinishedRequestStats]) -> None:
        detok = group.detoks[idx]
        lp_dicts = None if lps is None else make_logprob_dicts(self.tokenizer, new_ids, *lps)
        kept_before = len(detok.token_ids)
        decision = detok.append(new_ids, lp_dicts)
        if detok.logprobs is not None:  # running sum over kept tokens only
            group.cum_logprobs[idx] += sum(d[t].logprob for d, t in zip(detok.logprobs[kept_before:],
                                                                         detok.token_ids[kept_before:]))
        reason, stop_reason = None, None
        if decision is not None:
            kept = req.num_output_tokens - len(new_ids) + decision.num_tokens_kept
            req.truncate_output(kept)
            reason, stop_reason = decision.finish_reason, decision.stop_reason
        elif req.num_output_tokens >= req.params.max_tokens or req.num_tokens >= self.max_model_len:
            reason = "length"
        if reason is not None:
            self.scheduler.finish_request(req.request_id, reason, stop_reason)
            group.finished_seqs.add(idx)
            finished.append(FinishedRequestStats(reason, req.num_prompt_tokens, req.num_output_tokens,
                                                 time.monotonic() - req.arrival_time,
                                                 (req.first_scheduled_time or req.arrival_time) - req.arrival_time))

    def _make_output(self, group: _Group) -> RequestOutput:
        completions = []
        for i, (req, detok) in enumerate(zip(group.seqs, group.detoks)):
            reason = req.finish_reason if req.is_finished else None
            lps = detok.logprobs
            cum = None if lps is None else group.cum_logprobs[i]
            # Copies: the consumer may read them on another thread while this one goes on.
            completions.append(CompletionOutput(i, detok.streamable_text(reason is not None), list(detok.token_ids),
                                                cum, None if lps is None else list(lps), reason, req.stop_reason))
        first = group.seqs[0]
        metrics = RequestMetrics(group.arrival_time, first.first_scheduled_time, first.first_token_time,
                                 first.last_token_time, time.monotonic() if group.finished else None)
        # The prompt ids are never mutated after admission: shared, not copied per step.
        return RequestOutput(group.request_id, group.prompt, first.prompt_token_ids, completions,
                             group.finished, metrics, first.num_cached_tokens)

    def _forget(self, group: _Group) -> None:
        self.groups.pop(group.request_id, None)
        for req in group.seqs:
            self.seq_to_group.pop(req.request_id, None)

    def _stats(self, sched, num_generated: int, ttfts, itls, finished) -> StepStats:
        running, waiting, usage = self.scheduler.stats()
        aborted, self._num_aborted = self._num_aborted, 0
        return StepStats(running, waiting, usage, sched.num_prefill_tokens, num_generated,
                         len(sched.preempted_ids), sched.prefix_cache_queries, sched.prefix_cache_hits,
                         ttfts, itls, finished, aborted)


def _with_max_tokens(params: SamplingParams, max_tokens: int) -> SamplingParams:
    return dataclasses.replace(params, max_tokens=max_tokens)
