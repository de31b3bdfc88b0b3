"""Per-step choice of each request's draft length k from a measured cost model.

Expected goodput of a step = sum_r E[committed tokens of r | k_r, a_r] / T(N),
N = the step's decode tokens (1 + k_r per decoding request; prefill chunks are
owed whatever k is, so they are not priced in: a draft must beat the decode rate).
With a per-position acceptance rate a_r (EMA per request, starting from the
drafter-wide EMA over every request's verifications, itself starting at `prior`:
short requests on a workload the drafter does not suit start pessimistic),
E[committed | k] = 1 + a + a^2 + ... + a^k, so adding the j-th draft to r adds
a_r^j to the numerator and one token to N. The controller takes drafts in
decreasing order of a_r^j and keeps the prefix of that order with the best
goodput (for a T linear in N and free drafts this is the optimum); k = 0 for
every request is the non-speculative step. A tree drafter (`recycling`) gives
each node's acceptance probability itself (`gains`, decreasing), used in place
of a_r^j.

T(N) is the measured cost of a step of N tokens that all sample
(`LatencyTable`, engine/spec/latency.py: knots timed at start-up, refined online
from every such step). Hysteresis: a request keeps last
step's k unless the new plan's goodput beats the old plan's (both under the
current estimates) by `switch_margin`, so k does not flicker on a stationary
input.

A model drafter adds its passes to the step: pass j runs B_j requests (those
with k >= j) at D(B) = fixed + per_token * B (`draft_latency`, measured the
same way), so a step costs T(N) + sum_j D(B_j): the j-th draft of a request
adds one verify token, one row to pass j and, for the first request to reach
j, pass j's fixed cost.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from engine.spec.latency import LatencyModel, LatencyTable


@dataclass
class _Acceptance:
    rate: float
    k: int = 0


class DraftController:
    """Chooses k per request per step; `adaptive=False` gives every request max_k."""

    def __init__(self, max_k: int, latency: LatencyModel | LatencyTable, adaptive: bool = True,
                 prior: float = 0.6, ema: float = 0.05, switch_margin: float = 0.05,
                 draft_latency: LatencyModel | None = None):
        self.max_k, self.latency, self.adaptive = max_k, latency, adaptive
        self.draft_latency = draft_latency  # a model drafter's per-pass cost; None: free drafts
        self.prior, self.ema, self.switch_margin = prior, ema, switch_margin
        self.shared_rate = prior  # drafter-wide acceptance: a new request's starting estimate
        self._acc: dict[str, _Acceptance] = {}
        self._gains: dict[str, Sequence[float]] = {}  # this choose() call's drafter gains
        self._others = 0  # this choose() call's plain decodes (one committed token each)

    def acceptance(self, request_id: str) -> float:
        state = self._acc.get(request_id)
        return self.shared_rate if state is None else state.rate

    def choose(self, candidates: dict[str, int], other_tokens: int,
               gains: dict[str, Sequence[float]] | None = None) -> dict[str, int]:
        """candidates: request id -> drafts available (<= max_k); other_tokens: the step's
        plain decodes besides them (one sampled token each, committed whatever k is), which
        share the step's cost; gains: request id -> the drafter's P(draft i accepted),
        decreasing (a tree drafter; others: a_r^(i+1)). Returns id -> k. Every draft adds
        one sampled token to the step."""
        if not self.adaptive:
            return {rid: min(n, self.max_k) for rid, n in candidates.items()}
        base = other_tokens + len(candidates)
        self._gains = gains or {}
        self._others = other_tokens
        new = self._greedy(candidates, base)
        old = {rid: min(self._acc[rid].k, n) if rid in self._acc else 0
               for rid, n in candidates.items()}
        if new != old and self._goodput(new, base) < (1 + self.switch_margin) * self._goodput(old, base):
            new = old
        for rid, k in new.items():
            self._acc.setdefault(rid, _Acceptance(self.shared_rate)).k = k
        return new

    def _gain(self, rid: str, j: int) -> float:
        """Expected accepted tokens added by request rid's j-th draft (j >= 1)."""
        g = self._gains.get(rid)
        return g[j - 1] if g is not None else self.acceptance(rid) ** j

    def _greedy(self, candidates: dict[str, int], base: int) -> dict[str, int]:
        gains = sorted(((self._gain(rid, j), rid) for rid, n in candidates.items()
                        for j in range(1, min(n, self.max_k) + 1)), reverse=True)
        # Walk the gains in order and keep the best prefix (not the first local maximum: a
        # model drafter's pass has a fixed cost that only pays once several rows share it).
        plan = dict.fromkeys(candidates, 0)
        committed = float(len(candidates) + self._others)
        tokens, passes, draft_cost = base, 0, 0.0
        best, best_len = committed / self._step(tokens), 0
        taken: list[str] = []
        for gain, rid in gains:
            j = plan[rid] + 1  # this gain is the request's j-th draft
            draft_cost += self._draft_increment(j > passes)
            plan[rid], passes = j, max(passes, j)
            committed, tokens = committed + gain, tokens + 1
            taken.append(rid)
            value = committed / (self._step(tokens) + draft_cost)
            if value > best:
                best, best_len = value, len(taken)
        chosen = dict.fromkeys(candidates, 0)
        for rid in taken[:best_len]:
            chosen[rid] += 1
        return chosen

    def _draft_increment(self, new_pass: bool) -> float:
        d = self.draft_latency
        if d is None:
            return 0.0
        return d.per_token + (d.fixed if new_pass else 0.0)

    def _draft_cost(self, plan: dict[str, int]) -> float:
        d = self.draft_latency
        if d is None:
            return 0.0
        ks = [k for k in plan.values() if k]
        return sum(d.fixed + d.per_token * sum(k >= j for k in ks) for j in range(1, max(ks, default=0) + 1))

    def _goodput(self, plan: dict[str, int], base: int) -> float:
        committed = self._others + sum(1.0 + sum(self._gains[rid][:k]) if rid in self._gains
                        else self._expected(self.acceptance(rid), k) for rid, k in plan.items())
        return committed / (self._step(base + sum(plan.values())) + self._draft_cost(plan))

    def _step(self, tokens: int) -> float:
        return self.latency.predict(tokens, tokens)  # decodes and drafts all sample

    @staticmethod
    def _expected(a: float, k: int) -> float:
        """E[committed tokens] = 1 + a + ... + a^k."""
        if a >= 1.0 - 1e-9:
            return k + 1.0
        return (1.0 - a ** (k + 1)) / (1.0 - a)

    def observe(self, request_id: str, num_drafts: int, num_accepted: int) -> None:
        """Update a_r from one verification: accepted of drafted (a run, stops at a miss)."""
        if num_drafts <= 0:
            return
        state = self._acc.setdefault(request_id, _Acceptance(self.shared_rate))
        # Per-position rate from a truncated-geometric run: accepted / (accepted + 1 miss).
        tries = num_accepted + (1 if num_accepted < num_drafts else 0)
        sample = num_accepted / tries if tries else state.rate
        weight = 1.0 - (1.0 - self.ema) ** max(tries, 1)
        state.rate = min(max(state.rate + weight * (sample - state.rate), 0.0), 0.99)
        self.shared_rate = min(max(self.shared_rate + weight * (sample - self.shared_rate), 0.0), 0.99)

    def forget(self, request_id: str) -> None:
        self._acc.pop(request_id, None)
