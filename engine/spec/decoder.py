"""The engine's speculative decoder: drafts before each schedule, learns after each step.

Owned by EngineCore (engine thread only). Before `schedule()` it writes each
running, decoding request's `draft_token_ids` (the one writer of that field):
the drafter proposes up to max_k tokens and the controller picks k per request
(k = 0 leaves the request on the plain decode path). After the step it feeds
the acceptance of every verified request to the controller, the step's
(tokens, rows, seconds) to the latency model, and counts the spec metrics.

Constrained (grammar) requests keep only the drafts their grammar accepts (the
matcher validates them; the runner then masks each of the 1 + k positions with
the grammar advanced through the drafts before it). Model drafters (drafts
drawn inside the step) do not draft constrained requests.
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from engine.request import Request
from engine.sched.output import ScheduledRequest
from engine.spec.base import Drafter, Proposal
from engine.spec.controller import DraftController, StepRows
from engine.spec.latency import LatencyModel, LatencyTable, describe, fit_quality

log = logging.getLogger(__name__)

# A model drafter's catch-up (engine/spec/model_drafter.py: the draft KV of a request's
# prompt) is charged over at most this many of the request's future tokens: a budget of
# thousands rarely runs to its end, so amortizing over all of it would call the catch-up free.
CATCHUP_HORIZON = 256
# The sampling-cost probe's shape: the largest knot of at most this many tokens. It times
# what a temperature adds per sampled row, which does not depend on the step's size. On
# the largest knot (576 tokens at B = 64, fp32) an adaptive engine's probes took 22.5 s;
# on 16 x 9, 16.3 s.
SAMPLE_PROBE_TOKENS = 144


@dataclass
class SpecStats:
    """Verification counts: one step's (drained into StepStats) or the engine's totals."""
    num_drafts: int = 0  # requests verified with k > 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_position: list[int] = field(default_factory=list)  # [i]: drafts accepted at i
    draft_lengths: list[int] = field(default_factory=list)

    def add(self, k: int, accepted: int, keep_length: bool = True) -> None:
        self.num_drafts += 1
        self.num_draft_tokens += k
        self.num_accepted_tokens += accepted
        if keep_length:
            self.draft_lengths.append(k)
        if len(self.accepted_per_position) < k:
            self.accepted_per_position.extend([0] * (k - len(self.accepted_per_position)))
        for pos in range(accepted):
            self.accepted_per_position[pos] += 1


class SpeculativeDecoder:
    def __init__(self, drafter: Drafter, controller: DraftController):
        self.drafter, self.controller = drafter, controller
        self.stats = SpecStats()  # since the last drain
        self.totals = SpecStats()  # since start-up (draft_lengths not kept)
        self._sources: dict[str, int | None] = {}  # request id -> the source of its last drafts

    @property
    def max_k(self) -> int:
        return self.controller.max_k

    def propose(self, running: Sequence[Request], admitted: Sequence[Request] = ()) -> None:
        """Write each running decode's drafts for this step. `admitted`: the waiting requests
        the next schedules admit (with the running ones still in prefill they are the rows
        about to join the decode batch, whose size decides whether a catch-up pays back)."""
        candidates: dict[str, Proposal] = {}
        offered: dict[str, int] = {}  # each candidate's drafts within its token budget
        drafting: list[Request] = []  # the candidates' requests
        # Plain decodes besides the candidates. Prefill chunks are left out of the step the
        # controller prices: that work is owed whatever k is, and counting it would make
        # drafts look cheap beside it (a draft must pay at the decode rate).
        other = 0
        contexts: dict[str, int] = {}  # every decode row's context (what its KV read costs)
        joining = list(admitted)  # the rows about to decode
        for req in running:
            req.draft_token_ids, req.draft_parents = [], []
            if req.num_computed_tokens + 1 != req.num_tokens:
                joining.append(req)
                continue
            contexts[req.request_id] = req.num_computed_tokens
            proposal = self._proposal(req)
            room = min(len(proposal.drafts), self._room(req, 0))
            if room:
                candidates[req.request_id] = proposal
                offered[req.request_id] = room
                drafting.append(req)
            else:
                other += 1
        if not candidates:
            return
        gains = {rid: p.gains for rid, p in candidates.items() if p.gains is not None}
        rows = StepRows(gains, self._catchup(drafting),
                        [r.request_id for r in (*drafting, *joining) if not r.params.greedy],
                        contexts, self._upcoming(joining),
                        {rid: p.source for rid, p in candidates.items() if p.source is not None})
        chosen = self.controller.choose(offered, other, rows)
        for req in running:
            k = chosen.get(req.request_id, 0)
            if k:
                proposal = candidates[req.request_id]
                req.draft_token_ids = proposal.drafts[:k]
                req.draft_parents = proposal.parents[:k] if proposal.parents is not None else []
                self._sources[req.request_id] = proposal.source

    def _catchup(self, requests) -> dict[str, float]:
        """Request id -> backlog tokens per token it may still commit (its remaining budget,
        at most CATCHUP_HORIZON): a model drafter pays the backlog once when the request
        starts drafting, and the controller spreads that over the tokens it commits while
        drafting, so a long prompt near the end of its budget is not worth catching up on."""
        if not self.drafter.keeps_kv:
            return {}
        return {req.request_id: self._backlog_per_token(req, req.num_computed_tokens) for req in requests}

    @property
    def prices_joining(self) -> bool:
        """Whether `propose` prices the rows about to join the decode batch (only a drafter
        that keeps its own KV has catch-ups to price against them); else `admitted` is unused."""
        return self.drafter.keeps_kv

    def _upcoming(self, joining: Sequence[Request]) -> dict[str, tuple[int, float, int]]:
        """Request id -> (context, catch-up per token it may commit, drafts it may take) of
        each row about to join the decode batch, as it will be once its prompt is computed
        (and its first token sampled); only a drafter that keeps its own KV needs them (the
        controller prices catch-ups against them). A constrained request under a drafter
        that drafts inside the step never drafts: it joins as a plain decode."""
        if not self.prices_joining:
            return {}
        return {req.request_id: (req.num_tokens, self._backlog_per_token(req, req.num_tokens),
                                 0 if req.matcher is not None and self.drafter.needs_runner else self._room(req, 1))
                for req in joining}

    def _room(self, req: Request, first: int) -> int:
        """The drafts req may take in a step (at most max_k) once `first` more tokens are
        committed: the scheduler keeps a fully accepted run within max_tokens (`_drafts`), so
        drafts past it are never verified and must not be priced."""
        left = req.budget_left
        return self.max_k if left is None else max(0, min(self.max_k, left - first - 1))

    def _backlog_per_token(self, req: Request, computed: int) -> float:
        backlog = self.drafter.backlog(req.request_id, computed)
        if not backlog:
            return 0.0
        remaining = req.budget_left if req.params.max_tokens else CATCHUP_HORIZON
        return backlog / max(1, min(remaining, CATCHUP_HORIZON))

    def _proposal(self, req: Request) -> Proposal:
        if req.matcher is None:
            return self.drafter.propose_tree(req.request_id, req.token_ids, self.max_k)
        if self.drafter.needs_runner:
            return Proposal([])
        # Constrained: a chain only (the grammar masks rows after the drafts before them).
        proposal = self.drafter.propose_tree(req.request_id, req.token_ids, self.max_k)
        drafts = proposal.chain_prefix()
        return Proposal(drafts[:req.matcher.validate_tokens(drafts)] if drafts else drafts, source=proposal.source)

    def observe(self, scheduled: Sequence[ScheduledRequest], produced: dict[str, int],
                num_tokens: int, seconds: float, draft_passes: Sequence = (),
                logit_topk=None) -> None:
        """produced: request id -> tokens committed this step; the step computed
        `num_tokens` tokens in `seconds`, of which `draft_passes` (a model drafter's
        DraftPass records) took their own share; `logit_topk`: the runner's
        (input token, top ids) of each sampled row, for a drafter that learns from them."""
        self.drafter.learn([(e.request.token_ids, produced[e.request_id]) for e in scheduled
                            if e.request_id in produced], logit_topk)
        for entry in scheduled:
            k = entry.num_draft_tokens
            if not k or entry.request_id not in produced:
                continue
            accepted = produced[entry.request_id] - 1
            self.controller.observe(entry.request_id, k, accepted, self._sources.get(entry.request_id))
            self.stats.add(k, accepted)
            self.totals.add(k, accepted, keep_length=False)
        for p in draft_passes:
            self.controller.observe_draft_pass(p.rows, p.num_tokens, p.seconds, p.context)
            seconds -= p.seconds
        if num_tokens and seconds > 0:
            sampled = sum(1 + e.num_draft_tokens for e in scheduled if e.sample)
            stochastic = sum(1 + e.num_draft_tokens for e in scheduled if e.sample and not e.request.params.greedy)
            # The table's knots exclude what the rows' own contexts add (ContextCost).
            seconds -= sum(self.controller.context.row(e.start, e.num_tokens) for e in scheduled)
            rows = sum(1 for e in scheduled if e.sample)
            self.controller.latency.observe(num_tokens, max(seconds, 1e-6), sampled, stochastic, rows)

    def drain(self) -> SpecStats:
        stats, self.stats = self.stats, SpecStats()
        return stats

    def forget(self, request_id: str) -> None:
        self.drafter.forget(request_id)
        self.controller.forget(request_id)
        self._sources.pop(request_id, None)

    def preempted(self, request_ids: Sequence[str]) -> None:
        """Requests preempted this step (their acceptance estimates stay: same request)."""
        for rid in request_ids:
            self.drafter.preempted(rid)


def probe_shapes(max_k: int, max_tokens: int, max_rows: int = 1) -> list[tuple[int, int]]:
    """(rows, tokens per row) of the start-up probes, by tokens: one row of 1 .. 1 + max_k
    tokens (batch 1 at every draft length: the GEMV-to-GEMM jump lies here), then rows = 2,
    4, 8, ... and `max_rows`, each at 1, 2 and 1 + max_k tokens a row (its plain decode, one
    draft each, every draft), within `max_tokens` (the most tokens a step of the engine can
    have). Each row count is a line of the table (`LatencyTable`)."""
    shapes = [(1, n) for n in range(1, min(max_k + 1, max_tokens) + 1)]
    counts, rows = [], 2
    while rows < max_rows:
        counts.append(rows)
        rows *= 2
    for rows in counts + ([max_rows] if max_rows > 1 else []):
        shapes += [(rows, q) for q in sorted({1, 2, max_k + 1}) if rows * q <= max_tokens]
    return sorted(shapes, key=lambda s: (s[0] * s[1], s[0]))


def measure_latency(run_tokens, token_counts: Sequence[int] = (1, 4, 16, 48), repeats: int = 4,
                    what: str = "step") -> LatencyModel:
    """Fit T(N) from timed forward passes: `run_tokens(n)` runs one step of n tokens
    (False: it could not, for want of KV room; that count and larger ones are left out)."""
    samples = []
    run_tokens(token_counts[0])  # warm-up
    for n in token_counts:
        seconds = best_time(lambda: run_tokens(n), repeats)
        if seconds is None:  # no KV room for it, nor for larger ones
            break
        samples.append((n, seconds))
    model = LatencyModel.fit(samples)
    log.info("%s %s (fit rms error %.1f%% over N = %s)", what, describe(model),
             100 * fit_quality(model, samples), list(token_counts))
    return model


def measure_step_latency(run_probe, shapes: Sequence[tuple[int, int]], repeats: int = 4) -> LatencyTable:
    """The table of T(N, rows): `run_probe(rows, per_row, temperature)` runs one all-sampled
    step of that shape and returns False when it could not (no KV room): that probe and
    those of as many tokens or more are left out. Knots are greedy steps; one probed shape
    (`_sample_shape`) is timed `repeats` times more at temperature 1, alternating with as many
    greedy runs, and the difference of the bests per sampled token is the table's `sample_cost`.

    Each knot is the best of `repeats` runs taken in rounds over all shapes (not each shape's
    repeats in a row: the VM's speed drifts over the seconds the probes take, and timing
    the shapes one after the other put that drift between neighbouring knots; one server's
    table rose 0.6 ms a token from N = 20 to 30 and 3.5 ms from 30 to 44, and priced k = 1 at
    B = 16 7-10% below no drafts). A knot above a later one of its line is lowered to it: a
    step of more tokens does not cost less, so that knot caught an interruption. With the
    best of 2 and no such check, one server's table read {2: 41.0, 3: 55.7, ..., 12: 55.7} ms
    (the plateau from keeping knots non-decreasing) and batch 1 drafted 1 token a step."""
    run_probe(*shapes[0], 0.0)  # warm-up
    best = [math.inf] * len(shapes)
    usable = [True] * len(shapes)
    for _ in range(repeats):
        for i, (rows, per_row) in enumerate(shapes):
            if not usable[i]:
                continue
            seconds = best_time(lambda: run_probe(rows, per_row, 0.0), 1)
            if seconds is None:  # no KV room for it, nor for larger ones
                usable = [u and r * q < rows * per_row for u, (r, q) in zip(usable, shapes)]
                continue
            best[i] = min(best[i], seconds)
    knots = [(r, r * q, t) for (r, q), t, u in zip(shapes, best, usable) if u]
    sample_cost = _sample_cost(run_probe, _sample_shape(knots), repeats) if knots else 0.0
    for i in reversed(range(len(knots))):  # lowered to the next knot of its line
        r, n, t = knots[i]
        knots[i] = (r, n, min(t, next((later for r2, _, later in knots[i + 1:] if r2 == r), t)))
    table = LatencyTable([(n, t) for _, n, t in knots] or [(1, 0.05)], sample_cost=sample_cost,
                         rows=[r for r, _, _ in knots] if knots else None)
    log.info("step %s (%d probes)", describe(table), len(knots))
    return table


def _sample_shape(knots: Sequence[tuple[int, int, float]]) -> tuple[int, int]:
    """(rows, tokens per row) of the sampling-cost probe: the knot of the most tokens within
    SAMPLE_PROBE_TOKENS (the fewest when none is), the most rows at a tie."""
    within = [(n, r) for r, n, _ in knots if n <= SAMPLE_PROBE_TOKENS]
    n, r = max(within) if within else min((n, r) for r, n, _ in knots)
    return r, n // r


def _sample_cost(run_probe, shape: tuple[int, int], repeats: int) -> float:
    """Seconds per row that sampling at temperature 1 adds to argmax, on `shape`."""
    rows, per_row = shape
    times = {0.0: math.inf, 1.0: math.inf}  # temperature -> best seconds
    for _ in range(repeats):
        for temperature in times:
            seconds = best_time(lambda: run_probe(rows, per_row, temperature), 1)
            times[temperature] = min(times[temperature], math.inf if seconds is None else seconds)
    return max((times[1.0] - times[0.0]) / (rows * per_row), 0.0) if math.isfinite(times[1.0]) else 0.0


def best_time(run, repeats: int) -> float | None:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        if run() is False:
            return None
        best = min(best, time.perf_counter() - t0)
    return best
