"""How likely a chain drafter's j-th draft is to be accepted: the controller's gains.

A verification of k drafts accepts a run of `accepted` tokens (it stops at the first
miss). Position j was *tried* if the drafts before it were all accepted (and j <= k),
and *hit* if it was accepted too. The model keeps
  * the drafter-wide acceptance of first drafts, and of first drafts from each *source*
    a drafter names (`Proposal.source`; `ngram`: the length of the suffix match the
    drafts were copied after). A 4-token match and a 1-token guess are different
    populations: on the committed open chat workload's greedy replies (`ngram`, 32
    prompts x 64 tokens) a first draft after a 1-token match was accepted 12% of the
    time (582 tries) and after a 4-token match 69% (78), on grounded 23% and 90%.
    Pooled, open chat's 24% is below what a draft needs at B = 16 (~0.4), so every
    draft was priced alike and drafting followed a few tries (0.94-0.96x of no
    speculation); by source, the long matches pay and the short ones do not. Each source
    is its own population, from the same prior as the drafter-wide rate (with the
    drafter-wide rate as its prior, the 1-token guesses that most open chat proposals are
    pulled it to 0.18 in one B = 16 step, so the 4-token matches, priced there until
    tried, were never tried);
  * the first draft's acceptance per request and source (`first(rid, source)`): whether
    this request's text is one the drafter can predict at all (a copy of its prompt, or
    free chat); its prior is the drafter-wide rate of that source, so a new request
    starts from what the workload has shown. (Not one rate a request over all sources:
    its many 1-token misses would price its rare 4-token match at their rate. Nor that
    rate scaled by the request's hits over those its sources' rates expected: with one
    source, every swing of the drafter-wide rate then moves a well-tried request's rate
    too, and the stationary test's k changed 12 times in 100 steps on one seed of ten);
  * the acceptance of draft j given drafts 1..j-1 were accepted, drafter-wide
    (`hazard(j)`, j >= 2): once an n-gram lookup is right, its continuation usually is
    too (runs are longer than a single per-position rate would predict). Its prior is
    the pooled continuation rate (every try at any j >= 2, its own prior the first-draft
    rate): positions are alike far more than one try tells, and a position tried once
    must not stand on that try. With each position's prior the rate of the one before
    (one pseudo-try), one miss at draft 7 in a warm-up put that rate at 0.5 (0.95 once
    drafting) and priced the q8 self-draft out at open chat B = 16.
P(drafts 1..j all accepted) = first(rid, source) * hazard[2] * ... * hazard[j] is the gain of
the j-th draft (expected tokens it adds). Every rate is a ratio of exponentially
decayed counts with pseudo-tries at its prior: `strength` for the drafter-wide
first-draft rate and each source's, `request_strength` (1) for a
request's own (which remembers ~1 / (1 - request_decay) = 20 of its verifications),
`position_strength` for each continuation rate and `shared_strength` for the pooled one.

A request's own tries must outweigh its prior: a workload change (a server that served
grounded requests at ~70% first drafts, then open chat at 2%) leaves the drafter-wide
rate high for ~50 verifications, and at 4 pseudo-tries against at most 5 remembered
tries (decay 0.8) a request whose every draft missed stayed at 4/9 of that rate, above
what a draft needs at B = 1 (~6%): it drafted through its whole reply (0.96x of no
speculation; now ~10 misses stop it). What it does not mend: near break-even (ngram on
open chat at B = 16, where a first draft pays above ~0.4) which requests draft follows a
few tries either way; adaptive drafted 1.6-2.9 tokens a verification there with 14-19%
accepted (0.96x of no speculation; 0.95x with the old rates).

The drafter-wide rates remember ~1 / (1 - shared_decay) tries; decayed counts level
off at that many, so pseudo-tries keep their weight for good: a fixed prior biases
every position, and the bias multiplies along a chain (4 pseudo-tries at 0.6 on each
continuation predicted 5.8 accepted drafts of 8 where the q8 self-draft had 7.1). A
pooled prior is the data's own average, so it only pulls a position towards the others.

A request that is not drafted produces no evidence, so a pessimistic estimate would
never be revisited: each step a candidate is not drafted, its counts decay by
`idle_decay` (its rate drifts back towards the drafter-wide one and it is tried
again once that pays), and a step without any verification decays the drafter-wide
first-draft counts by `shared_idle_decay` (towards the prior).

Whether an exploration may pay (the controller's `_deeper_may_pay`) is asked of the
rates' upper estimates: each raised towards 1 by a few pseudo-hits over the tries it
rests on (`gains(..., optimism)`). A continuation rate no plan reaches keeps its value,
but the tries its upper estimate counts age by `untested_decay` a step, so it is
explored again once they are few, and not while many recent tries price it.
"""
from __future__ import annotations

from dataclasses import dataclass


def _upper(value: float, optimism: float, evidence: float) -> float:
    """`value` raised towards 1 by `optimism` pseudo-hits over `evidence` tries: an upper
    estimate that is 1 for an untried rate and the value itself for a well-tried one."""
    return value + (1.0 - value) * optimism / (evidence + optimism)


@dataclass
class _Rate:
    """(hits + strength * prior) / (tries + strength) over decayed counts."""
    hits: float = 0.0
    tries: float = 0.0
    fresh: float = 1.0  # the share of `tries` the upper estimate counts (ages while untested)

    def value(self, prior: float, strength: float) -> float:
        return (self.hits + strength * prior) / (self.tries + strength)

    def fade(self, decay: float) -> None:
        self.hits *= decay
        self.tries *= decay

    def add(self, hit: bool, decay: float) -> None:
        evidence = self.tries * self.fresh * decay + 1.0  # the aged tries go on ageing
        self.hits = self.hits * decay + hit
        self.tries = self.tries * decay + 1.0
        self.fresh = evidence / self.tries


@dataclass(frozen=True)
class AcceptanceConfig:
    """The acceptance model's strengths and decays (see the module docstring)."""
    prior: float = 0.6
    strength: float = 4.0
    request_strength: float = 1.0
    request_decay: float = 0.95
    shared_decay: float = 0.98
    idle_decay: float = 0.95
    shared_idle_decay: float = 0.995
    shared_strength: float = 1.0
    position_strength: float = 4.0
    untested_decay: float = 0.95


class AcceptanceModel:
    def __init__(self, max_k: int, config: AcceptanceConfig = AcceptanceConfig()):
        self.config = config
        self._shared_first = _Rate()
        self._sources: dict[int, _Rate] = {}  # each proposal source's first drafts
        self._hazard = [_Rate() for _ in range(max_k + 1)]  # [j]: draft j given 1..j-1 (j >= 2)
        self._pooled = _Rate()  # every continuation try, whatever its position
        self._first: dict[str, dict[int | None, _Rate]] = {}  # request -> source -> its first drafts

    def _source_rate(self, source: int | None) -> _Rate:
        """The drafter-wide first-draft counts of `source` (None: of every proposal)."""
        return self._shared_first if source is None else self._sources.get(source, _Rate())

    def shared_first(self, source: int | None = None) -> float:
        """The drafter-wide acceptance of first drafts (a new request's estimate), or of
        those from `source` (each source its own population, from the same prior)."""
        return self._source_rate(source).value(self.config.prior, self.config.strength)

    def first(self, request_id: str, source: int | None = None) -> float:
        """The request's own first-draft rate for proposals from `source`, with 1 pseudo-try
        (`request_strength`) at the drafter-wide rate of that source."""
        shared = self.shared_first(source)
        rate = self._first.get(request_id, {}).get(source)
        return shared if rate is None else rate.value(shared, self.config.request_strength)

    def pooled(self) -> float:
        """The continuation rate over all positions (each position's prior)."""
        return self._pooled.value(self.shared_first(), self.config.shared_strength)

    def hazard(self, j: int) -> float:
        """P(draft j accepted | drafts 1..j-1 accepted), j >= 2."""
        return self._hazard[j].value(self.pooled(), self.config.position_strength)

    def evidence(self, j: int) -> float:
        """The decayed tries behind draft j's rate (j = 1: the drafter-wide first-draft rate;
        j >= 2: the continuation rate of draft j)."""
        rate = self._shared_first if j <= 1 else self._hazard[min(j, len(self._hazard) - 1)]
        return rate.tries

    def continuations(self, optimism: float = 0.0) -> list[float]:
        """[1.0, hazard(2), ..., hazard(max_k)]: what a chain's gains multiply by, draft by
        draft; with `optimism` every continuation rate at its upper estimate (`_upper`).
        The same for every request, so a step's pricing reads it once."""
        pooled, strength = self.pooled(), self.config.position_strength
        out = [1.0]
        for h in self._hazard[2:]:
            rate = h.value(pooled, strength)
            out.append(_upper(rate, optimism, h.tries * h.fresh) if optimism else rate)
        return out

    def gains(self, request_id: str, k: int, optimism: float = 0.0, source: int | None = None,
              continuations: list[float] | None = None) -> list[float]:
        """[P(drafts 1..j accepted) for j = 1..k], decreasing, for a proposal from `source`.
        With `optimism`, every rate is at its upper estimate (`_upper`): what the drafts
        could be worth where the rates rest on few tries. A request's first-draft rate counts
        the drafter-wide tries of its source as its evidence too (that rate is its prior).
        `continuations`: `self.continuations(optimism)`, when the caller has read it."""
        p = self.first(request_id, source)
        if optimism:
            own = self._first.get(request_id, {}).get(source)
            p = _upper(p, optimism, (own.tries if own else 0.0) + self._source_rate(source).tries)
        out = []
        for rate in (continuations or self.continuations(optimism))[:k]:
            p *= rate
            out.append(p)
        return out

    def observe(self, request_id: str, num_drafts: int, num_accepted: int, source: int | None = None) -> None:
        """One verification of `num_drafts` drafts from `source`, `num_accepted` accepted."""
        if num_drafts <= 0:
            return
        hit = num_accepted >= 1
        self._first.setdefault(request_id, {}).setdefault(source, _Rate()).add(hit, self.config.request_decay)
        self._shared_first.add(hit, self.config.shared_decay)
        if source is not None:
            self._sources.setdefault(source, _Rate()).add(hit, self.config.shared_decay)
        for j in range(2, min(num_drafts, num_accepted + 1, len(self._hazard) - 1) + 1):
            self._hazard[j].add(num_accepted >= j, self.config.shared_decay)  # tried: 1..j-1 accepted
            self._pooled.add(num_accepted >= j, self.config.shared_decay)

    def idle(self, request_ids, deepest: int) -> None:
        """A step in which `request_ids` (candidates) were not drafted and no request
        drafted deeper than `deepest`. Its candidates' first-draft rates fade towards the
        drafter-wide one, and that one towards the prior when nothing was drafted; the
        continuation rates it could not test keep their values, but the tries their upper
        estimates count age (`untested_decay`), so a rate left untested comes to rest on
        few tries again and its upper estimate rises until an exploration tests it."""
        for rid in request_ids:
            for rate in self._first.get(rid, {}).values():
                rate.fade(self.config.idle_decay)
        if not deepest:
            for rate in (self._shared_first, *self._sources.values()):
                rate.fade(self.config.shared_idle_decay)
        for rate in self._hazard[max(deepest, 1) + 1:]:
            rate.fresh *= self.config.untested_decay

    def forget(self, request_id: str) -> None:
        self._first.pop(request_id, None)
