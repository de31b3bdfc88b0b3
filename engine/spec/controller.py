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

T(N, S) = fixed + per_token * N + per_sample * S (S = rows that sample: a
draft adds one token and one sampled row, a prefill token only a token) is
fitted at start-up from timed forward passes of both shapes (`LatencyModel.fit3`)
and refined online from every step's measured time (exponentially weighted
least squares). Hysteresis: a request keeps last
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

import math
from collections.abc import Sequence
from dataclasses import dataclass, field


ONE_TOKEN_EMA = 0.1  # weight of a new one-token step time in `LatencyModel.one_token`


@dataclass
class LatencyModel:
    """T(N, S) = fixed + per_token * N + per_sample * S seconds for a step of N tokens of which
    S compute logits and sample (each such row costs an LM-head row and the sampler, which a
    prefill token does not). `fit3` measures all three from probes of both shapes; online,
    `observe` refines fixed and per_token by weighted least squares on T - per_sample * S.

    A one-token step can cost less than the line through the others predicts (the native
    GGUF kernels run one row as a GEMV, two or more as GEMM tiles: a jump of ~30% at batch
    1); `fit3` then keeps it apart: `one_token` is that step's measured time (refined
    online by an EMA) and the line is fitted to N >= 2 only, so a draft at batch 1 pays
    for the jump it causes."""
    fixed: float
    per_token: float
    per_sample: float = 0.0
    decay: float = 0.98  # weight of the past per new sample (online refinement)
    _sums: list[float] = field(default_factory=lambda: [0.0] * 5)  # w, wN, wT, wNN, wNT
    one_token: float | None = None  # measured T of a one-token step; None: on the line

    @classmethod
    def fit(cls, samples: Sequence[tuple[int, float]], decay: float = 0.98) -> "LatencyModel":
        model = cls(0.0, 0.0, 0.0, decay)
        for n, t in samples:
            model._add(n, t, 1.0)
        model._solve()
        return model

    @classmethod
    def fit3(cls, samples: Sequence[tuple[int, int, float]], decay: float = 0.98) -> "LatencyModel":
        """Least squares over (N, S, T) samples; needs both shapes (S ~ N and S << N)."""
        import torch

        ones = [t for n, _, t in samples if n == 1]
        rest = [x for x in samples if x[0] > 1]
        if ones and len(rest) >= 3 and len({n == s for n, s, _ in rest}) == 2:
            samples = rest  # the one-token step is measured on its own
        x = torch.tensor([[1.0, n, s] for n, s, _ in samples], dtype=torch.float64)
        y = torch.tensor([[t] for _, _, t in samples], dtype=torch.float64)
        coef = [max(float(c), 0.0) for c in torch.linalg.lstsq(x, y).solution.flatten()]
        model = cls(0.0, 0.0, coef[2], decay)
        for n, s, t in samples:  # fixed and per_token given per_sample (and its clamp)
            model._add(n, t - model.per_sample * s, 1.0)
        model._solve()
        if samples is rest:
            model.one_token = min(min(ones), model.predict(1, 1))  # only ever a discount
        return model

    def predict(self, num_tokens: int, num_sampled: int = 0) -> float:
        if num_tokens == 1 and self.one_token is not None:
            return self.one_token
        return max(self.fixed + self.per_token * num_tokens + self.per_sample * num_sampled, 1e-6)

    def observe(self, num_tokens: int, seconds: float, num_sampled: int = 0) -> None:
        if num_tokens == 1 and self.one_token is not None:
            self.one_token += ONE_TOKEN_EMA * (seconds - self.one_token)
            return
        self._sums = [s * self.decay for s in self._sums]
        self._add(num_tokens, seconds - self.per_sample * num_sampled, 1.0)
        self._solve()

    def _add(self, n: int, t: float, w: float) -> None:
        s = self._sums
        s[0] += w
        s[1] += w * n
        s[2] += w * t
        s[3] += w * n * n
        s[4] += w * n * t

    def _solve(self) -> None:
        w, sn, st, snn, snt = self._sums
        det = w * snn - sn * sn
        if w <= 0:
            return
        if abs(det) < 1e-12 * max(w * snn, 1.0):  # one distinct N so far: keep the slope
            self.fixed = st / w - self.per_token * sn / w
            return
        slope = (w * snt - sn * st) / det
        self.per_token = max(slope, 0.0)
        self.fixed = max((st - self.per_token * sn) / w, 0.0)


@dataclass
class _Acceptance:
    rate: float
    k: int = 0


class DraftController:
    """Chooses k per request per step; `adaptive=False` gives every request max_k."""

    def __init__(self, max_k: int, latency: LatencyModel, adaptive: bool = True,
                 prior: float = 0.6, ema: float = 0.05, switch_margin: float = 0.05,
                 draft_latency: LatencyModel | None = None):
        self.max_k, self.latency, self.adaptive = max_k, latency, adaptive
        self.draft_latency = draft_latency  # a model drafter's per-pass cost; None: free drafts
        self.prior, self.ema, self.switch_margin = prior, ema, switch_margin
        self.shared_rate = prior  # drafter-wide acceptance: a new request's starting estimate
        self._acc: dict[str, _Acceptance] = {}
        self._gains: dict[str, Sequence[float]] = {}  # this choose() call's drafter gains
        self._sampled = 0  # this choose() call's sampled rows minus tokens (<= 0)
        self._others = 0  # this choose() call's other sampled rows

    def acceptance(self, request_id: str) -> float:
        state = self._acc.get(request_id)
        return self.shared_rate if state is None else state.rate

    def choose(self, candidates: dict[str, int], other_tokens: int,
               gains: dict[str, Sequence[float]] | None = None, other_sampled: int = 0) -> dict[str, int]:
        """candidates: request id -> drafts available (<= max_k); other_tokens: tokens of the
        step besides the decoding requests' 1 + k that the choice should share the step's
        cost with (the engine passes its plain decodes), of which `other_sampled` sample; gains: request id -> the drafter's P(draft i accepted),
        decreasing (a tree drafter; others: a_r^(i+1)). Returns id -> k. Every draft adds
        one token and one sampled row to the step."""
        if not self.adaptive:
            return {rid: min(n, self.max_k) for rid, n in candidates.items()}
        base = other_tokens + len(candidates)
        self._gains = gains or {}
        self._sampled = other_sampled + len(candidates) - base  # sampled = tokens + this
        self._others = other_sampled  # the other sampled rows commit one token each
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
        return self.latency.predict(tokens, tokens + self._sampled)

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


def describe(model: LatencyModel) -> str:
    return (f"latency model: T(N, S) = {model.fixed * 1e3:.2f} ms + "
            f"{model.per_token * 1e3:.3f} ms x N tokens + {model.per_sample * 1e3:.3f} ms x S sampled"
            + (f"; a one-token step {model.one_token * 1e3:.2f} ms" if model.one_token is not None else ""))


def fit_quality(model: LatencyModel, samples: Sequence[tuple]) -> float:
    """Root-mean-square relative error of the model on (N, T) or (N, S, T) samples."""
    errs = [(model.predict(*x[:-1]) - x[-1]) / x[-1] for x in samples if x[-1] > 0]
    return math.sqrt(sum(e * e for e in errs) / len(errs)) if errs else 0.0
