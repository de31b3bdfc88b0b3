"""Per-step choice of each request's draft length k from a measured cost model.

Expected goodput of a step = sum_r E[committed tokens of r | k_r] / T(N),
N = the step's decode tokens (1 + k_r per decoding request; prefill chunks are
owed whatever k is, so they are not priced in: a draft must beat the decode rate).
E[committed | k] = 1 + g_r(1) + ... + g_r(k), with g_r(j) = P(drafts 1..j of r all
accepted): from `AcceptanceModel` (engine/spec/acceptance.py: the request's own
first-draft rate, starting from the drafter-wide one, times drafter-wide
continuation rates) for chain drafters, or the drafter's own per-node
probabilities (`gains`, decreasing) for a tree drafter (`recycling`). Adding r's
j-th draft adds g_r(j) to the numerator and one token to N; the controller takes
drafts in decreasing order of gain and keeps the prefix of that order with the
best goodput (for a T linear in N and free drafts this is the optimum); k = 0
for every request is the non-speculative step.

T(N) is the measured cost of a step of N tokens that all sample
(`LatencyTable`, engine/spec/latency.py: knots timed at start-up with greedy
rows, refined online from every such step), plus the table's per-row cost of
sampling at a temperature for the tokens of `stochastic` candidates, plus what
each row's own context adds (`ContextCost`, same file: the table is probed on rows
after one shared context): a row of L context tokens costs
L * (per_token + per_query_token) in every step, each of its drafts
L * per_query_token more and, with a model drafter, L * draft_per_token more for
its row in the draft pass. Hysteresis: a request keeps last
step's k unless the new plan's goodput beats the old plan's (both under the
current estimates) by `switch_margin` (2%), so k does not flicker on a stationary
input; a plan with fewer drafts only has to beat it (a draft that stopped
paying is dropped at once, not kept at a small loss), and an old plan priced under
no drafts at all is not held (a plan that swaps one row's draft for another's was
held at 0.7% under the plain step against a new one 0.7% over it). The margin bounds what it
costs: near the best k goodput is flat (a q8 self-draft at B = 1: k = 8 is 3.7%
over k = 6), and at 5% adaptive sat at k = 7 for most of a run, 3-4% below k = 8.
Draft margin: drafts are taken at all only where the best plan beats the plain step by
DRAFT_MARGIN (5%, `_greedy`; `_plain_is_best` screens by the same). Near break-even the
choice rests on start-up probes and rates that move by a few percent between runs: the
q8 self-draft at B = 16 (32 prompts, paired lockstep rounds) read 0.969-1.056x of no
speculation without it and 0.984-1.081x with it, +1.7% a round over 6 rounds (5 of 6 ahead).
Explorations ask whether drafts may pay at all, so `_deeper_may_pay` prices with no margin.
Exploration: a draft position no plan reaches gets no evidence, so after
EXPLORE_AFTER steps in a row in which no request drafted as deep as it could, up to
EXPLORE_ROWS requests draft all they can for one step (`_explore`; a model drafter
whose first draft is untested, EXPLORE_GUESS_DEPTH: `_explore_depth`); the wait doubles
each time, but an exploration that accepted far more drafts than the estimates
expected is followed by another after EXPLORE_SOON steps.

A model drafter adds its passes to the step: pass j runs B_j requests (those
with k >= j) at D(B) = fixed + per_token * B (`draft_latency`, measured the
same way), so a step costs T(N) + sum_j D(B_j): the j-th draft of a request
adds one verify token, one row to pass j and, for the first request to reach
j, pass j's fixed cost. A draft model must also have the KV of every committed
token before it drafts for a request: starting one whose backlog is b tokens
costs b x c once (c = `catchup_per_token`, the cost of a backlog token fed in pass 0
beyond its rows: measured at start-up, learnt online from every pass 0 with a
backlog; those passes are prefill-shaped and stay out of D's fit, which they would
bend towards a lower slope and a higher fixed cost), which the controller spreads over the tokens
the request commits while drafting (`catchup[r]` = b / the tokens it may still
commit): each token r commits in a drafting step carries c x catchup[r].
So a long prompt is caught up on at batch 1, where drafts pay many times over,
and not at a batch size where they barely pay for their own passes; and a request
still behind is priced at the batch it is about to be in (`_defer_catchups`: the
rows in prefill and those admitted next join as candidates), not at the few rows
that decode while the rest of a wave prefills. Paid up front on forecasts, a catch-up
starts only where its plan beats the best plan without it by CATCHUP_MARGIN
(`_hold_catchups`). Its last
draft is never fed to the draft model (no pass follows it), so when all k drafts
are accepted the next step's pass 0 feeds it, one token beyond the request's row:
a request drafting k adds c x P(all k accepted) to the step (left out, k = 1 looked
cheaper than it is).
"""
from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from engine.spec.acceptance import AcceptanceConfig, AcceptanceModel
from engine.spec.latency import ContextCost, LatencyModel, LatencyTable

CATCHUP_DECAY = 0.9  # weight of the past in the catch-up rate, per pass 0 with a backlog
PRIOR_TOKENS = 32.0  # the start-up measurement counts as this many backlog tokens
EXPLORE_AFTER = 32  # steps in a row leaving drafts untested before an exploration
EXPLORE_ROWS = 4  # requests an exploration drafts as deep as they can
EXPLORE_SOON = 8  # the wait after an exploration that accepted far more than expected
EXPLORE_SURPRISE = 1.25  # "far more": this many times the accepted drafts expected
EXPLORE_EVIDENCE = 2.0  # tries below which a rate is a guess (explored after EXPLORE_SOON steps)
EXPLORE_GUESS_DEPTH = 2  # a model drafter's exploration depth while its first-draft rate is a guess
EXPLORE_BACKLOG = 1.0  # a draft model's backlog per token a request may commit, at most, to explore it
EXPLORE_OPTIMISM = 2.0  # pseudo-hits on every rate in the test whether exploring may pay
EXPLORE_FIRST = 0.5  # the least first-draft rate (upper estimate) of a request an exploration drafts
CATCHUP_MARGIN = 0.10  # a plan starting catch-ups beats the same plan without them by this much
PLAIN_CHECK_AFTER = 8  # steps in a row with drafts before one plain step (while drafts pay little)
PLAIN_CHECK_GAIN = 1.15  # "little": the plan's goodput under this many times the plain step's
DRAFT_MARGIN = 0.05  # a plan with drafts is taken over the plain step only if it beats it by this much


@dataclass(frozen=True)
class StepRows:
    """What the decoder knows of a step's rows besides the candidates' draft counts (each
    field keyed by request id; absent: none)."""
    # The drafter's own P(draft i accepted), decreasing (a tree drafter); others: the
    # acceptance model's.
    gains: Mapping[str, Sequence[float]] = field(default_factory=dict)
    # A draft model's backlog per token the request may still commit: every candidate of a
    # drafter that keeps its own KV, 0 when caught up; absent: no such KV.
    catchup: Mapping[str, float] = field(default_factory=dict)
    # The candidates and upcoming rows sampled at a temperature (their rows cost more than argmax).
    stochastic: Collection[str] = ()
    # Context tokens of every decode row of the step (candidates and plain decodes; absent: 0).
    contexts: Mapping[str, int] = field(default_factory=dict)
    # (context, catch-up per token, drafts it may take) of the rows about to join the decode
    # batch (requests in prefill, and those admitted next).
    upcoming: Mapping[str, tuple[int, float, int]] = field(default_factory=dict)
    # Each candidate's proposal source (`Proposal.source`).
    sources: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Pricing:
    """What one `choose` call prices its plans with, besides the controller's cost models.
    `_defer_catchups` and `_deeper_may_pay` price other batches or rates with a copy."""
    gains: dict[str, Sequence[float]]  # each candidate's P(drafts 1..j accepted), j = 1..
    tree: frozenset[str]  # candidates whose gains are their drafter's own (a draft tree)
    others: int  # plain decodes besides the candidates (one committed token each)
    catchup: Mapping[str, float]  # a draft model's backlog per token a request may commit
    stochastic: frozenset[str]  # requests sampled at a temperature
    contexts: Mapping[str, int]  # context tokens of each decode row
    context_base: float  # what every decode row's context costs its one token
    behind: frozenset[str]  # candidates that would start a catch-up by drafting
    sources: Mapping[str, int]  # each candidate's proposal source (absent: none named)


class DraftController:
    """Chooses k per request per step; `adaptive=False` gives every request max_k."""

    def __init__(self, max_k: int, latency: LatencyModel | LatencyTable, adaptive: bool = True,
                 prior: float = 0.6, switch_margin: float = 0.02,
                 draft_latency: LatencyModel | None = None, catchup_per_token: float | None = None,
                 context: ContextCost = ContextCost()):
        self.max_k, self.latency, self.adaptive = max_k, latency, adaptive
        self.context = context  # what each row's own context adds (probed at start-up)
        self.draft_latency = draft_latency  # a model drafter's per-pass cost; None: free drafts
        # Seconds per backlog token fed in pass 0 beyond its rows (None: D's per_token), as a
        # ratio of decayed sums (time beyond D(rows), backlog tokens) over the passes seen.
        self._backlog = [0.0, 0.0] if catchup_per_token is None else [catchup_per_token * PRIOR_TOKENS, PRIOR_TOKENS]
        self.prior, self.switch_margin = prior, switch_margin
        self.accept = AcceptanceModel(max_k, AcceptanceConfig(prior=prior))
        self._k: dict[str, int] = {}  # each request's k of its last plan (hysteresis)
        self._idle, self._explore_after = 0, EXPLORE_AFTER  # steps in a row leaving drafts untested; the wait
        self._explored: dict[str, float] = {}  # the last exploration's requests -> accepted drafts expected
        self._surprise = [0.0, 0.0]  # the last exploration's accepted drafts, and those expected
        self._soon = False  # the next exploration after EXPLORE_SOON steps (the last one surprised)
        self._drafting = 0  # steps in a row whose plan drafted (`_plain_check`)

    def acceptance(self, request_id: str, source: int | None = None) -> float:
        """The estimated acceptance of the request's first draft from `source`."""
        return self.accept.first(request_id, source)

    def choose(self, candidates: dict[str, int], other_tokens: int, rows: StepRows = StepRows()) -> dict[str, int]:
        """candidates: request id -> drafts available (<= max_k); other_tokens: the step's
        plain decodes besides them (one sampled token each, committed whatever k is), which
        share the step's cost; rows: what else is known of the step's rows (`StepRows`).
        Returns id -> k. Every draft adds one sampled token to the step."""
        if not self.adaptive:
            return {rid: min(n, self.max_k) for rid, n in candidates.items()}
        base = other_tokens + len(candidates)
        tree = frozenset(rows.gains)
        catchup, contexts, sources = rows.catchup, rows.contexts, rows.sources
        chain = self.accept.continuations()
        p = Pricing({rid: rows.gains[rid] if rid in tree else self.accept.gains(rid, n, 0.0, sources.get(rid), chain)
                     for rid, n in candidates.items()},
                    tree, other_tokens, catchup, frozenset(rows.stochastic), contexts,
                    sum(self.context.row(n) for n in contexts.values()),
                    # A draft model is behind on these and they did not draft last step (one
                    # that did owes at most its last accepted draft: `_draft_costs`).
                    frozenset(rid for rid in candidates if catchup.get(rid) and not self._k.get(rid)),
                    sources)
        if self._plain_is_best(p, candidates, base):
            new = dict.fromkeys(candidates, 0)  # what `_plan` would return, at a fraction of its cost
        else:
            candidates, new = self._plan(p, candidates, base, rows.upcoming)
        self._k.update(new)  # hysteresis holds the plan, not an exploration's one-off depths
        explored = self._explore(p, candidates, base, new)
        if explored == new and self._plain_check(p, new, base):
            return dict.fromkeys(new, 0)  # not a choice against drafts: no rate fades (`idle`)
        new = explored
        self.accept.idle([rid for rid, k in new.items() if not k], max(new.values(), default=0))
        return new

    def _plan(self, p: Pricing, candidates: dict[str, int], base: int,
              upcoming: Mapping[str, tuple[int, float, int]]) -> tuple[dict[str, int], dict[str, int]]:
        """(the candidates left after `_defer_catchups`, the step's plan): the best plan
        (`_greedy`, `_hold_catchups`) unless hysteresis keeps last step's."""
        candidates = self._defer_catchups(p, candidates, base, upcoming)
        new = self._hold_catchups(p, candidates, base, self._greedy(p, candidates, base))
        old = self._held(candidates)
        plain = dict.fromkeys(candidates, 0)
        if any(old.values()) and self._goodput(p, old, base) < self._goodput(p, plain, base):
            old = plain  # drafts that stopped paying are not held against a new plan's
        # Hysteresis: more drafts must beat the old plan by the margin, fewer only beat it.
        margin = 1.0 if sum(new.values()) < sum(old.values()) else 1.0 + self.switch_margin
        if new != old and self._goodput(p, new, base) < margin * self._goodput(p, old, base):
            new = old
        return candidates, new

    def _held(self, candidates: dict[str, int]) -> dict[str, int]:
        """Last step's plan for `candidates` (the plan hysteresis holds to), within the
        drafts each has now."""
        return {rid: min(self._k.get(rid, 0), n) for rid, n in candidates.items()}

    def _plain_is_best(self, p: Pricing, candidates: dict[str, int], base: int) -> bool:
        """Whether no plan beats the plain step, by a bound that prices no plan (free drafts
        only; then `_plan` returns the plain step). A plan of n drafts commits at most base +
        the n largest gains on offer, and its step takes at least T(base + n) with the plain
        step's context reads and n times the least a draft's context adds (rows sampled at a
        temperature only add): when even that is no faster than the plain step (by
        `switch_margin` when last step's plan for these was plain: hysteresis keeps it), no
        plan is. On open chat at B = 16 (`ngram`: mostly 1-token guesses at 0.1-0.3, where a
        draft needs ~0.5) `_plan` took most of `choose`'s 0.45-0.57 ms a step; with the
        drafter's proposals that cost 1.5% of the step's time."""
        if self.draft_latency is not None:
            return False  # a model drafter's catch-up terms may lower a draft's cost
        offered = [rid for rid, n in candidates.items() if n]
        if not offered:
            return True
        gains = np.sort(np.concatenate([p.gains[rid][:min(candidates[rid], self.max_k)] for rid in offered]))[::-1]
        drafts = np.arange(1, len(gains) + 1)  # the n of each prefix
        reads = min(self._context_increment(p, rid) for rid in offered)  # what a draft's context adds, at least
        sto = sum(rid in p.stochastic for rid in candidates)
        plain = self._step(base, sto, base) + p.context_base
        steps = self._steps(base + drafts, np.full(len(gains), sto), base) + p.context_base + reads * drafts
        # Last step's plan drafted none of these: a plan with drafts must beat it by the margins.
        lead = max(self.switch_margin, DRAFT_MARGIN)
        margin = (1.0 if any(self._held(candidates).values()) else 1.0 + lead) * (1.0 - 1e-9)
        return bool(np.all((base + np.cumsum(gains)) * plain < margin * base * steps))

    def _defer_catchups(self, p: Pricing, candidates: dict[str, int], base: int,
                        upcoming: Mapping[str, tuple[int, float, int]]) -> dict[str, int]:
        """`candidates`, with no drafts for a request still behind (a draft model's catch-up
        ahead of it) that would not draft in the batch it is about to be in: these decode
        rows plus the `upcoming` ones, each a candidate for the drafts it may take at the
        drafter-wide rates with its own context and catch-up (none: a plain decode). A
        catch-up pays back over the steps its request drafts after it; priced at the decode
        batch of the moment, the few rows decoding while the others prefill made a
        400-token catch-up look cheap, and the request stopped drafting as the batch filled
        (a server's grounded B = 16: 4 catch-ups in its first steps, 0.91x of no
        speculation, then not one draft)."""
        if not upcoming or not p.behind:
            return candidates
        chain = self.accept.continuations()
        future = replace(p, gains={**p.gains, **{rid: self.accept.gains(rid, self.max_k, continuations=chain)
                                                 for rid in upcoming}},
                         catchup={**p.catchup, **{rid: c for rid, (_, c, _) in upcoming.items()}},
                         contexts={**p.contexts, **{rid: n for rid, (n, _, _) in upcoming.items()}},
                         context_base=p.context_base + sum(self.context.row(n) for n, _, _ in upcoming.values()))
        plan = self._greedy(future, {**candidates, **{rid: k for rid, (_, _, k) in upcoming.items()}},
                            base + len(upcoming))
        return {rid: 0 if rid in p.behind and not plan[rid] else n for rid, n in candidates.items()}

    def _hold_catchups(self, p: Pricing, candidates: dict[str, int], base: int,
                       plan: dict[str, int]) -> dict[str, int]:
        """`plan`, unless the catch-ups it starts raise its goodput by less than
        CATCHUP_MARGIN over the best plan without them. A catch-up is paid now and repaid
        only if the forecasts it was priced on hold for the request's remaining tokens: the
        catch-up rate (start-up probe 0.47 ms per backlog token; 0.8-1.0 ms learnt in one
        grounded B = 4 run), the drafting steps' cost and the tokens left (a budget, or 256
        without one, where replies often end sooner). Near break-even the start is a coin
        toss: the q8 self-draft at grounded B = 4 ran every fixed k at 0.87-0.95x of no drafts
        in one run (adaptive, starting catch-ups for 405 drafts, 0.91x) and at 1.04-1.10x in
        another. Requests already drafting switch at the usual `switch_margin`."""
        if not any(plan[rid] for rid in p.behind):
            return plan
        # Without any start (not only the plan's: the rest must not start one unpriced).
        rest = self._greedy(p, {rid: 0 if rid in p.behind else n for rid, n in candidates.items()}, base)
        if self._goodput(p, plan, base) >= (1.0 + CATCHUP_MARGIN) * self._goodput(p, rest, base):
            return plan
        return rest

    def _plain_check(self, p: Pricing, plan: dict[str, int], base: int) -> bool:
        """Whether this step runs plain instead of `plan` (which stays the plan): after
        PLAIN_CHECK_AFTER steps in a row with drafts, while the plan's goodput is under
        PLAIN_CHECK_GAIN times the plain step's. The plain step is the price drafts are
        weighed against, and steps with drafts do not teach it: one server's probe priced
        16 plain rows at 68.7 ms (the next server's: 50.6), it drafted at B = 16 on that
        price and ran 0.89x of no drafts. A plain step beside drafting ones teaches the table
        its own price (`LatencyTable`: CONTRAST_STEPS). Where drafts pay more, a misprice
        of the plain step cannot turn the choice, and the plain step would cost more."""
        if not any(plan.values()):
            self._drafting = 0
            return False
        self._drafting += 1
        if self._drafting <= PLAIN_CHECK_AFTER:
            return False
        if self._goodput(p, plan, base) >= PLAIN_CHECK_GAIN * self._goodput(p, dict.fromkeys(plan, 0), base):
            return False
        self._drafting = 0
        return True

    def _explore(self, p: Pricing, candidates: dict[str, int], base: int, plan: dict[str, int]) -> dict[str, int]:
        """`plan`, unless it left drafts untested (no request drafts as deep as some could)
        for a while: then up to EXPLORE_ROWS requests draft all they can (`_explore_depth`),
        and the wait doubles. A draft position no plan reaches is never tested, so estimates
        a warm-up left low would stand for good: with the q8 self-draft at open chat B = 16, one run
        kept its continuation rates at 0.725 (0.94-0.99 once drafting) and drafted nothing,
        at 0.87x of k = 8; others drafted k = 1 (which tests no continuation rate) at 0.90x.
        The wait is `_explore_after`, or EXPLORE_SOON when the last exploration surprised or
        the rate of the first draft the plan leaves out rests on fewer than
        EXPLORE_EVIDENCE tries (a guess: one miss at draft 2 on a fresh engine's first
        verification kept its warm-up at k = 1). A draft model's catch-up is paid for by
        the drafting steps after it, which an exploration that finds drafting does not pay
        never has (two explorations at B = 16 caught up on ~300-token prompts and cost 10%
        of the run): only requests whose backlog is at most EXPLORE_BACKLOG per token they
        may still commit are explored, the least behind first, and of those the likeliest to
        accept a first draft: an exploration tests the rates past it, which a first miss leaves
        untested (with `ngram` on open chat, candidate order explored mostly 1-token guesses,
        accepted ~12% of the time, beside 4-token matches at ~69%). A tree drafter's gains are
        its own and learn from every step, so it is never explored."""
        if not any(candidates.values()):
            return plan  # every candidate deferred (`_defer_catchups`): nothing was left to test
        top = max(plan.values())
        if top >= min(self.max_k, max(candidates.values())):
            self._idle, self._explore_after = 0, EXPLORE_AFTER  # every position some request can draft is tested
            return plan
        self._idle += 1
        # A guess is explored soon only for a plan of at most one draft a request (it tests
        # no continuation rate at all; deeper plans test the next rates now and then, and
        # exploring them soon, then soon again after each surprise, changed k 16 times in
        # 100 steps at 0.7 a draft), and only as the first wait (a first draft that keeps
        # missing never reaches draft 2, which would stay a guess for good).
        thin = (top <= 1 and self._explore_after == EXPLORE_AFTER
                and self.accept.evidence(top + 1) < EXPLORE_EVIDENCE)
        if self._idle < (EXPLORE_SOON if self._soon or thin else self._explore_after):
            return plan
        behind = {rid: p.catchup.get(rid, 0.0) for rid, n in candidates.items() if n and rid not in p.tree}
        pool = [rid for rid, backlog in behind.items()  # candidate order
                if backlog <= EXPLORE_BACKLOG and self._may_hit_first(rid, p.sources.get(rid))]
        if not pool:
            return plan
        self._idle, self._soon = 0, False
        eligible, depth = set(pool), self._explore_depth()
        if not self._deeper_may_pay(p, {rid: min(candidates[rid], depth) if rid in eligible else 0
                                        for rid in candidates}, base, plan):
            return plan  # asked again after the same wait: the untested rates fade meanwhile
        self._explore_after *= 2
        # The least behind, then the likeliest to accept a first draft (stable: ties keep candidate order).
        least = sorted(pool, key=lambda rid: (behind[rid], -p.gains[rid][0]))[:EXPLORE_ROWS]
        deep = {rid: min(candidates[rid], depth) for rid in least}
        self._explored = {rid: sum(p.gains[rid][:k]) for rid, k in deep.items()}
        self._surprise = [0.0, 0.0]
        return {rid: max(k, deep.get(rid, 0)) for rid, k in plan.items()}

    def _may_hit_first(self, request_id: str, source: int | None) -> bool:
        """Whether the request's first draft is accepted at least EXPLORE_FIRST of the time
        at its upper estimate: an exploration tests the rates past the first draft, and a
        row whose first draft misses tests none of them for its max_k verify tokens. With
        `ngram` on open chat at B = 16, explorations of 4 rows at first-draft rates of
        0.30-0.36 (1-token matches, well tried) added 28-32 tokens to a 16-token step, one
        step's time each, and accepted 2 drafts; with explorations off the run went from
        0.968x to 0.987x of no speculation (3 lockstep rounds)."""
        return self.accept.gains(request_id, 1, EXPLORE_OPTIMISM, source)[0] >= EXPLORE_FIRST

    def _explore_depth(self) -> int:
        """How deep an exploration drafts: all it can, except a model drafter whose first-draft
        rate is a guess (under EXPLORE_EVIDENCE tries): EXPLORE_GUESS_DEPTH. Its every draft
        costs a pass, and a chain's drafts past a first miss are never tried: `layerskip`
        (half the layers, 19 ms a pass beside a 33 ms step at B = 1) accepted none of its
        drafts, and its explorations of 8 cost 5% of a run at B = 1 (0.95x of no
        speculation; 0.985x at 2, grounded, offline). A first draft that hits lets the plan
        draft, or the exploration surprise, and the next one goes deeper."""
        if self.draft_latency is not None and self.accept.evidence(1) < EXPLORE_EVIDENCE:
            return min(EXPLORE_GUESS_DEPTH, self.max_k)
        return self.max_k

    def _deeper_may_pay(self, p: Pricing, candidates: dict[str, int], base: int, plan: dict[str, int]) -> bool:
        """Whether a request would draft deeper than in `plan` if every rate were at its
        upper estimate (EXPLORE_OPTIMISM pseudo-hits: 1 for an untried rate, its value for a
        well-tried one). Where even that does not pay nothing is explored: a draft model at
        a large batch, or rates that many tries put where the plan already prices them
        (with every draft taken as accepted, grounded B = 16 and B = 64 explored 4 rows
        every wait, all accepted as expected, and paid 2-5% of the run for it)."""
        chain = self.accept.continuations(EXPLORE_OPTIMISM)
        hopeful = replace(p, gains={rid: self.accept.gains(rid, len(g), EXPLORE_OPTIMISM, p.sources.get(rid), chain)
                                    for rid, g in p.gains.items()})
        flat = self._greedy(hopeful, candidates, base, margin=0.0)
        return any(flat[rid] > plan[rid] for rid in candidates)

    def _explored_row(self, request_id: str, num_accepted: int) -> None:
        """An explored request's verification: once all are in, an exploration that
        accepted over EXPLORE_SURPRISE times the drafts the estimates expected, plus one, is
        followed by another after EXPLORE_SOON steps (the estimates are behind); the
        doubled wait applies after that one. (Not any excess: four first drafts at 97% all
        accepted are no news.)"""
        expected = self._explored.pop(request_id)
        self._surprise = [self._surprise[0] + num_accepted, self._surprise[1] + expected]
        if not self._explored and self._surprise[0] > EXPLORE_SURPRISE * self._surprise[1] + 1:
            self._soon = True

    def _greedy(self, p: Pricing, candidates: dict[str, int], base: int,
                margin: float = DRAFT_MARGIN) -> dict[str, int]:
        """The best prefix of the candidates' drafts taken in decreasing order of gain (rid's
        j-th draft adds p.gains[rid][j - 1] committed tokens). Every prefix is priced, not only
        up to the first local maximum: a model drafter's pass has a fixed cost that only pays
        once several rows share it. Vectorized over the drafts (64 rows x 8 drafts: 512
        prefixes a step, ~1 ms a call as a Python loop). No drafts unless the best prefix's
        goodput beats the plain step's by `margin` (DRAFT_MARGIN; see the module docstring)."""
        ids = list(candidates)
        # (gain, request, j): equal gains keep a request's drafts in j order (its gains do not rise).
        order = sorted(((g, r, -j) for r, rid in enumerate(ids)
                        for j, g in enumerate(p.gains[rid][:min(candidates[rid], self.max_k)], 1)), reverse=True)
        sto0 = sum(rid in p.stochastic for rid in ids)  # tokens sampled at a temperature
        committed0 = float(len(ids) + p.others)
        best = committed0 / (self._step(base, sto0, base) + p.context_base)
        if not order:
            return dict.fromkeys(ids, 0)
        gain, row, j = (np.array(col) for col in zip(*order))
        j = -j
        cost = self._draft_costs(p, ids, self._gain_matrix(p, ids), row, j)
        tokens = base + np.arange(1, len(order) + 1)
        sto = sto0 + np.cumsum([ids[r] in p.stochastic for r in row])
        values = (committed0 + np.cumsum(gain)) / (self._steps(tokens, sto, base) + p.context_base + np.cumsum(cost))
        top = int(np.argmax(values))
        taken = row[:top + 1] if values[top] > (1.0 + margin) * best else row[:0]
        counts = np.bincount(taken, minlength=len(ids)).tolist()
        return dict(zip(ids, counts))

    def _context_increment(self, p: Pricing, rid: str) -> float:
        """What one more draft of rid adds through its context: one more query token over
        it in the target step and, with a model drafter, its row in one more draft pass."""
        rate = self.context.per_query_token + (self.context.draft_per_token if self.draft_latency else 0.0)
        return p.contexts.get(rid, 0) * rate

    @property
    def catchup_per_token(self) -> float | None:
        """Seconds per backlog token a pass 0 feeds beyond its rows (None: no model drafter)."""
        if self.draft_latency is None:
            return None
        seconds, tokens = self._backlog
        return seconds / tokens if tokens else self.draft_latency.per_token

    def _gain_matrix(self, p: Pricing, ids: list[str]) -> np.ndarray:
        """[len(ids), max_k]: p.gains of each request, 0 past its last."""
        out = np.zeros((len(ids), self.max_k))
        for r, rid in enumerate(ids):
            g = p.gains[rid][:self.max_k]
            out[r, :len(g)] = g
        return out

    def _draft_costs(self, p: Pricing, ids: list[str], gains: np.ndarray, row: np.ndarray,
                     j: np.ndarray) -> np.ndarray:
        """What each draft adds to the step beyond its verify token; draft i is request
        ids[row[i]]'s j[i]-th (`gains`: `_gain_matrix`), and each request's drafts come in j
        order. Its context's reads and, with a model drafter, its draft-pass row (a new pass's
        fixed cost for the first draft to reach a depth), its share of its request's catch-up
        (1 + the drafts' gains carry it) and the change in the expected cost of feeding the
        request's last draft to the draft model next step."""
        cost = np.array([self._context_increment(p, rid) for rid in ids])[row]
        d = self.draft_latency
        if d is None:
            return cost
        gain = gains[row, j - 1]
        before = np.where(j > 1, gains[row, np.maximum(j - 2, 0)], 0.0)
        deepest = np.maximum.accumulate(np.concatenate(([0], j[:-1])))
        rate = self.catchup_per_token
        behind = np.array([p.catchup.get(rid) or 0.0 for rid in ids])[row]
        fed = np.array([rid in p.catchup for rid in ids])[row]
        return (d.per_token + d.fixed * (j > deepest) + cost + rate * behind * (gain + (j == 1))
                + rate * fed * (gain - before))

    def _goodput(self, p: Pricing, plan: dict[str, int], base: int) -> float:
        committed = p.others + sum(1.0 + sum(p.gains[rid][:k]) for rid, k in plan.items())
        sto = sum(1 + k for rid, k in plan.items() if rid in p.stochastic)
        ids = list(plan)
        ks = np.array([plan[rid] for rid in ids])
        extra = 0.0
        if ks.any():  # each request's drafts 1..k, in j order
            row = np.repeat(np.arange(len(ids)), ks)
            j = np.arange(len(row)) - np.repeat(np.cumsum(ks) - ks, ks) + 1
            extra = float(self._draft_costs(p, ids, self._gain_matrix(p, ids), row, j).sum())
        return committed / (self._step(base + sum(plan.values()), sto, base) + p.context_base + extra)

    def _step(self, tokens: int, stochastic: int, rows: int) -> float:
        """A step of `rows` decode rows (`base`: drafts add tokens, not rows), all sampled."""
        return self.latency.predict(tokens, tokens, stochastic, rows)

    def _steps(self, tokens: np.ndarray, stochastic: np.ndarray, rows: int) -> np.ndarray:
        return self.latency.predict_many(tokens, stochastic, rows)  # `_step` of each

    def observe_draft_pass(self, rows: int, tokens: int, seconds: float, context: int = 0) -> None:
        """Learn from one of a model drafter's passes: `rows` requests fed `tokens` tokens
        after `context` tokens of their own contexts in all. One token a row refines D; a
        pass 0 with backlog tokens refines the catch-up rate from its time beyond D(rows)."""
        d = self.draft_latency
        if d is None or not rows:
            return
        seconds -= context * self.context.draft_per_token  # D is priced at the probes' shared context
        if tokens <= rows:
            d.observe(rows, seconds)
            return
        # A ratio of sums, not a mean of ratios: a pass 0 that fed one accepted last draft
        # carries a few ms of noise over one token and must not swing the rate.
        self._backlog = [self._backlog[0] * CATCHUP_DECAY + max(seconds - d.predict(rows), 0.0),
                         self._backlog[1] * CATCHUP_DECAY + (tokens - rows)]

    def observe(self, request_id: str, num_drafts: int, num_accepted: int, source: int | None = None) -> None:
        """Learn from one verification: accepted of drafted (a run, stops at a miss) of a
        proposal from `source`."""
        if request_id in self._explored:
            self._explored_row(request_id, num_accepted)
        self.accept.observe(request_id, num_drafts, num_accepted, source)

    def forget(self, request_id: str) -> None:
        self._k.pop(request_id, None)
        self._explored.pop(request_id, None)
        self.accept.forget(request_id)
