"""EngineCore.step(): schedule -> execute (guarded) -> update -> detokenize/stop -> outputs + stats.

Owns the scheduler, the model runner and one detokenizer per sequence. A user
request with n > 1 becomes n sequences (`<id>#<i>`) whose prompt blocks are
shared through the prefix cache; its outputs carry all n completions.
`validate` is the one place ids and lengths are checked against the model;
`add_request` always runs it, so no caller (offline `LLM` or `AsyncEngine`)
can hand the step a token id it cannot embed or a length it cannot hold.
A fault while building the batch, sampling or detokenizing for one request
finishes that request (all its n sequences) with finish_reason "error"; the
engine and the other requests go on (`StepGuard`).
Not thread-safe: AsyncEngine drives it from a single thread.
"""
from __future__ import annotations

import dataclasses
import logging
import time

from engine.errors import ContextLengthError, ParamError
from engine.output import make_logprob_dicts
from engine.outputs import FinishedRequestStats, RequestOutput, StepStats
from engine.request import Request
from engine.request_group import RequestGroup
from engine.sampling_params import SamplingParams, check_text
from engine.sched.output import ModelRunnerOutput, SchedulerOutput
from engine.setup import EngineParts
from engine.step_guard import StepGuard
from engine.structured.backend import CompiledGrammar, GrammarError
from engine.structured.compiler import GrammarCompiler

FAST_FORWARD_MAX = 256  # forced tokens appended at once, at most

log = logging.getLogger(__name__)


class EngineCore:
    def __init__(self, parts: EngineParts):
        self.parts = parts
        self.tokenizer = parts.tokenizer
        self.scheduler = parts.scheduler
        self.runner = parts.runner
        self.max_model_len = parts.scheduler.config.max_model_len
        self.vocab_size = parts.model_config.vocab_size
        self.eos_token_ids = parts.eos_token_ids
        self.groups: dict[str, RequestGroup] = {}
        self.seq_to_group: dict[str, tuple[RequestGroup, int]] = {}
        self.guard = StepGuard(self.runner.execute)
        args = parts.args
        self.grammars = GrammarCompiler(parts.tokenizer, self.vocab_size, args.structured_outputs_backend,
                                        args.grammar_compile_timeout_s)
        self.enable_fast_forward = args.enable_fast_forward
        self._num_fast_forward = 0
        self._levels_offered = 0  # shared-prefix levels offered / decomposed since start (debug log)
        self._levels_taken = 0
        self._structured_kinds: list[str] = []
        # (start time, [(seq id, tokens)]) of the step being computed, for the watchdog.
        self.current_step: tuple[float, tuple[tuple[str, int], ...]] | None = None
        self._num_aborted = 0
        self._pending_outputs: list[RequestOutput] = []
        self._finished_stats: list[FinishedRequestStats] = []
        self._ttfts: list[float] = []
        self._itls: list[float] = []
        self.spec = parts.spec  # SpeculativeDecoder or None

    # ---- intake ------------------------------------------------------------
    def tokenize(self, prompt: str | list[int]) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            check_text(prompt, "prompt")
            return prompt, self.tokenizer.encode(prompt)
        return None, list(prompt)

    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Ids against the vocabulary, lengths against the context; ParamError names the field."""
        vocab = self.vocab_size
        if not prompt_ids:
            raise ParamError("the prompt must contain at least one token", "prompt")
        if not all(type(t) is int and 0 <= t < vocab for t in prompt_ids):
            raise ParamError(f"prompt token ids must be integers in [0, {vocab})", "prompt")
        if not all(0 <= t < vocab for t in params.stop_token_ids):
            raise ParamError(f"stop_token_ids must be token ids in [0, {vocab})", "stop_token_ids")
        if not all(0 <= t < vocab for t in (params.logit_bias or {})):
            raise ParamError(f"logit_bias keys must be token ids in [0, {vocab})", "logit_bias")
        n, limit = len(prompt_ids), self.max_model_len
        want = n + (params.max_tokens or 1)
        if n >= limit or want > limit:
            raise ContextLengthError(
                f"This model's maximum context length is {limit} tokens. However, you requested {want} tokens "
                f"({n} in the prompt, {params.max_tokens or 1} for the completion). Please reduce the prompt "
                "or max_tokens.", "max_tokens" if n < limit else "prompt")

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                    priority: int = 0, arrival_time: float | None = None, prompt_text: str | None = None,
                    grammar: CompiledGrammar | None = None) -> None:
        """`prompt` is text or token ids; `prompt_text` names ids already tokenized by the caller;
        `grammar` is `params.structured_outputs` compiled by the caller (else compiled here)."""
        if not isinstance(request_id, str) or request_id in self.groups:
            raise ParamError(f"duplicate request id {request_id!r}", "request_id")
        text, prompt_ids = self.tokenize(prompt)
        text = text if text is not None else prompt_text
        self.validate(prompt_ids, params)
        if params.max_tokens is None:
            params = dataclasses.replace(params, max_tokens=self.max_model_len - len(prompt_ids))
        spec = params.structured_outputs
        if spec is not None and grammar is None:
            grammar = self.grammars.compile(spec)
        arrival = arrival_time or time.monotonic()
        group = RequestGroup(request_id, text, params, arrival)
        leader = None
        for i in range(params.n):
            seq_id = request_id if params.n == 1 else f"{request_id}#{i}"
            seed = params.seed + i if params.seed is not None and not params.greedy else None
            req = Request(seq_id, prompt_ids, params, self.eos_token_ids, arrival_time=arrival,
                          priority=priority, prefix_leader=leader, seed=seed,
                          matcher=grammar.new_matcher() if spec is not None else None)
            leader = leader or req
            group.add_seq(req, self.tokenizer, self.eos_token_ids)
            self.seq_to_group[seq_id] = (group, i)
        self.groups[request_id] = group
        if spec is not None:
            self._structured_kinds.append(spec.kind)
        for req in group.seqs:
            self.scheduler.add_request(req)
        if spec is not None:
            self._fast_forward_at_admission(group)

    def _fast_forward_at_admission(self, group: RequestGroup) -> None:
        """A grammar that forces its first tokens (`{"` of a JSON object) has them appended
        now, so the prefill computes them with the prompt; a structure complete at admission
        (one `choice`) finishes without a step."""
        for idx, req in enumerate(group.seqs):
            try:
                reason, stop_reason = self._fast_forward(group, idx, req)
            except Exception as exc:  # the request is registered: it fails like any other
                self._fail(req.request_id, exc)
                return
            if reason is not None:
                self._finish_seq(group, idx, req, reason, stop_reason)
        if group.finished:
            self._queue_last_output(group)

    def abort(self, request_id: str) -> bool:
        group = self.groups.get(request_id)
        if group is None:
            return False
        self._finish_group(group, "abort")
        return True

    def has_unfinished(self) -> bool:
        return bool(self.groups) or bool(self._pending_outputs)

    # ---- the step ------------------------------------------------------------
    def step(self) -> tuple[list[RequestOutput], StepStats]:
        outputs, self._pending_outputs = self._pending_outputs, []
        start = time.monotonic()
        if self.spec is not None:
            # next_admitted walks the waiting queue's prefix-cache hits: only when it is used
            admitted = self.scheduler.next_admitted() if self.spec.prices_joining else ()
            self.spec.propose(self.scheduler.running, admitted)
        sched = self.scheduler.schedule()
        if self.spec is not None and sched.preempted_ids:
            self.spec.preempted(sched.preempted_ids)
        produced: list[tuple[Request, list[int]]] = []
        lp_by_id: dict = {}
        result = None
        if not sched.is_empty:
            sched, result = self._execute(sched)
            if result is not None:
                produced = self.scheduler.update(sched, result)
                lp_by_id = dict(zip(result.request_ids, result.logprobs)) if result.logprobs else {}
        if self.spec is not None and produced:
            self.spec.observe(sched.scheduled, {r.request_id: len(t) for r, t in produced},
                              sched.num_batched_tokens, time.monotonic() - start,
                              result.draft_passes if result is not None else (),
                              result.logit_topk if result is not None else None)
        outputs.extend(self._process(produced, lp_by_id))
        duration = 0.0 if sched.is_empty else time.monotonic() - start
        stats = self._stats(sched, sum(len(t) for _, t in produced), duration)
        if result is not None:
            stats = self._shared_prefix_stats(stats, result.shared_prefix)
        return outputs, stats

    def _shared_prefix_stats(self, stats: StepStats, shared: tuple[int, int, int]) -> StepStats:
        taken, offered, tokens = shared
        self._levels_offered += offered
        self._levels_taken += taken
        if offered and log.isEnabledFor(logging.DEBUG):
            log.debug("shared-prefix attention: %d of %d levels decomposed (%d tokens); %d of %d since start",
                      taken, offered, tokens, self._levels_taken, self._levels_offered)
        return dataclasses.replace(stats, shared_prefix_groups=taken, shared_prefix_tokens=tokens)

    def _execute(self, sched: SchedulerOutput) -> tuple[SchedulerOutput, ModelRunnerOutput | None]:
        """The model step under the guard; culprit requests are failed, the rest computed."""
        self.current_step = (time.monotonic(), tuple((s.request_id, s.num_tokens) for s in sched.scheduled))
        try:
            sched, result, culprits = self.guard.execute(sched, self._siblings)
        finally:
            self.current_step = None
        for seq_id, exc in culprits.items():
            self._fail(seq_id, exc)
        return sched, result

    def _process(self, produced: list[tuple[Request, list[int]]], lp_by_id: dict) -> list[RequestOutput]:
        """Detokenize and stop-check each request's new tokens; one request's failure is its own."""
        now = time.monotonic()
        dirty: dict[str, RequestGroup] = {}
        for req, new_ids in produced:
            group, idx = self.seq_to_group.get(req.request_id, (None, 0))
            if group is None:
                continue  # failed earlier in this step
            self._timing(req, len(new_ids), now)
            try:
                lps = lp_by_id.get(req.request_id)
                lp_dicts = None if lps is None else make_logprob_dicts(self.tokenizer, new_ids, *lps)
                reason, stop_reason = group.append(idx, req, new_ids, lp_dicts, self.max_model_len)
                if reason is None:
                    reason, stop_reason = self._fast_forward(group, idx, req)
            except Exception as exc:
                self._fail(req.request_id, exc)
                dirty.pop(group.request_id, None)
                continue
            if reason is not None:
                self._finish_seq(group, idx, req, reason, stop_reason)
            dirty[group.request_id] = group
        outputs, self._pending_outputs = self._pending_outputs, []
        for group in dirty.values():
            out = group.make_output()
            if out is not None:
                outputs.append(out)
            if group.finished:
                self._forget(group)
        return outputs

    def _fast_forward(self, group: RequestGroup, idx: int, req: Request) -> tuple[str | None, int | str | None]:
        """Append the tokens the grammar allows alone (each the only allowed token at its
        position) without sampling them; the next step computes them in one pass, like a
        prefill chunk. Greedy output is unchanged: a sole allowed token is what greedy picks.
        Off when the request wants logprobs (forced tokens have no distribution to report)."""
        if req.matcher is None or not self.enable_fast_forward or req.params.logprobs is not None:
            return None, None
        room = min(req.budget_left, self.max_model_len - req.num_tokens,
                   FAST_FORWARD_MAX)
        forced = req.matcher.forced_tokens(room) if room > 0 else []
        if not forced:
            return None, None
        req.append_output(forced)
        self._num_fast_forward += len(forced)
        return group.append(idx, req, forced, None, self.max_model_len)

    def _timing(self, req: Request, num_new: int, now: float) -> None:
        if req.first_token_time is None:
            req.first_token_time = now
            self._ttfts.append(now - req.arrival_time)
        else:
            self._itls.extend([(now - req.last_token_time) / num_new] * num_new)
        req.last_token_time = now

    # ---- finishing -------------------------------------------------------------
    def _siblings(self, seq_ids: set[str]) -> set[str]:
        """Every sequence id of the groups the given sequences belong to."""
        out = set(seq_ids)
        for seq_id in seq_ids:
            entry = self.seq_to_group.get(seq_id)
            if entry is not None:
                out.update(r.request_id for r in entry[0].seqs)
        return out

    def _fail(self, seq_id: str, exc: BaseException) -> None:
        """Finish the request owning `seq_id` (all n sequences) with finish_reason "error"."""
        entry = self.seq_to_group.get(seq_id)
        if entry is None:
            return
        group = entry[0]
        log.error("request %s failed; finishing it with an error", group.request_id, exc_info=exc)
        group.error = f"{type(exc).__name__} while processing the request"
        spec = group.params.structured_outputs
        if isinstance(exc, GrammarError) and spec is not None:  # the client's constraint, not our fault
            group.error = f"the output constraint cannot be followed: {str(exc)[:300]}"
            group.error_param = spec.param
        self._finish_group(group, "error")

    def _finish_group(self, group: RequestGroup, reason: str) -> None:
        """Abort or fail every unfinished sequence, queue the group's last output, forget it."""
        for idx, req in enumerate(group.seqs):
            if idx in group.finished_seqs:
                continue
            if self.scheduler.finish_request(req.request_id, reason) is not None:
                if reason == "abort":
                    self._num_aborted += 1
                else:
                    self._record_finished(req)
            group.finished_seqs.add(idx)
        group.aborted = True
        self._queue_last_output(group)

    def _finish_seq(self, group: RequestGroup, idx: int, req: Request, reason: str,
                    stop_reason: int | str | None) -> None:
        """Sequence `idx` finished on its own (stop, length): free it, count it."""
        self.scheduler.finish_request(req.request_id, reason, stop_reason)
        group.finished_seqs.add(idx)
        self._record_finished(req)

    def _queue_last_output(self, group: RequestGroup) -> None:
        """A group finished outside a step's output pass: its last output goes out next step."""
        out = group.make_output()
        if out is not None:
            self._pending_outputs.append(out)
        self._forget(group)

    def _record_finished(self, req: Request) -> None:
        n = req.num_output_tokens
        tpot = None
        if n > 1 and req.first_token_time is not None and req.last_token_time is not None:
            tpot = (req.last_token_time - req.first_token_time) / (n - 1)
        self._finished_stats.append(FinishedRequestStats(
            req.finish_reason, req.num_prompt_tokens, n, time.monotonic() - req.arrival_time,
            (req.first_scheduled_time or req.arrival_time) - req.arrival_time, tpot))

    def _forget(self, group: RequestGroup) -> None:
        self.groups.pop(group.request_id, None)
        for req in group.seqs:
            self.seq_to_group.pop(req.request_id, None)
            if self.spec is not None:
                self.spec.forget(req.request_id)

    def _stats(self, sched, num_generated: int, duration: float) -> StepStats:
        running, waiting, usage = self.scheduler.stats()
        aborted, self._num_aborted = self._num_aborted, 0
        finished, self._finished_stats = self._finished_stats, []
        ttfts, itls, self._ttfts, self._itls = self._ttfts, self._itls, [], []
        kinds, self._structured_kinds = self._structured_kinds, []
        forced, self._num_fast_forward = self._num_fast_forward, 0
        return StepStats(running, waiting, usage, sched.num_prefill_tokens, num_generated,
                         len(sched.preempted_ids), sched.prefix_cache_queries, sched.prefix_cache_hits,
                         ttfts, itls, finished, aborted, kinds, forced, duration,
                         len(sched.scheduled), self.spec.drain() if self.spec is not None else None)
