"""Step-latency models the draft controller prices its plans with.

`LatencyTable` is the target step's cost T(N) for a step of N tokens that all sample
(decodes and verifications: the steps a draft-length choice changes). It is a
piecewise-linear curve through knots measured at start-up (one timed forward pass
per knot: one row of N tokens up to the longest verification, then rows of 1 + k
tokens), so it follows whatever shape the kernels give it: on the native CPU path
one row runs as a GEMV and two or more as GEMM tiles (a jump of ~60% from N = 1
to N = 2), and attention and sampling grow with the rows. Beyond the last knot the
curve goes on with the last segment's slope. Knot times are kept non-decreasing in N.

Online, every step whose tokens all sampled is learnt from in two parts: a scale shared
by all knots moves towards the step's measured / predicted time (SCALE_EMA), then the
two knots around its N take a slower share of what the scaled curve still misses
(TABLE_EMA, split by the interpolation weights). Steps with prefill tokens are not of
the table's shape and are skipped. A workload visits a few N (its plain decode step
most), and with the knots learnt alone the visited ones moved with the VM while the
rest kept their probe times: a draft model's grounded B = 4 run learnt its plain step
at 71 ms against a 50 ms probe while the drafting steps' knots stayed at the probes,
so the two plans were priced from different minutes of the machine. The shared scale
carries a drift of the whole machine to every knot; the knots' own learning is left
with what differs by shape.

`LatencyModel` is a straight line T(N) = fixed + per_token * N fitted by
(exponentially weighted) least squares, its fitted samples kept as anchors: a model
drafter's pass over B rows, and
the synthetic models the controller's unit tests inject.

`ContextCost` is what each row's context adds to a step beyond the table's probes:
the table is probed on rows after one shared context (the shared-prefix attention
reads it once for all rows), while each real row reads its own KV. Over 16 rows of
their own contexts on this CPU's fp32 path, 384 tokens each against 128 added 16 ms to
a 16 x 1 step (63 -> 79 ms) and 41 ms to a 16 x 9 one (229 -> 270 ms); 64 x 1 went
from 152 to 209 ms. A row with L context tokens and q query tokens adds
L * (per_token + per_query_token * q): ~2.9 us + 0.7 us x q per context token, so a
row of ~300 tokens costs ~1 ms per decode step and a draft ~0.2 ms more, left out of
the table, which priced a server's B = 16 decode steps at 54-58 ms where they ran at
89-93 ms. The controller charges it per row and per draft; the table learns from
each step's time less it.

Both answer `predict(num_tokens, num_sampled, num_stochastic)` and
`observe(num_tokens, seconds, num_sampled, num_stochastic)`; `num_sampled` only
tells the table which steps to learn from. The table's knots are greedy steps
(argmax rows); a row sampled at a temperature (softmax, top-k/top-p, a float64
cumsum over the vocabulary) costs `sample_cost` more: 0.25 ms per row on this
CPU's fp32 path, 38 ms of a 186 ms step of 16 verifications of 8 drafts, which
probes sampled at temperature 1 charged to greedy workloads as well.
"""
from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

SCALE_EMA = 0.1  # weight of one observed step in the table's shared scale
SCALE_CLAMP = 2.0  # one step is learnt as if it ran at most this many times its prediction (or 1/x)
TABLE_EMA = 0.03  # weight of one observed step in the knots around its N (after the scale's share)
ANCHOR_WEIGHT = 0.25  # a fitted sample's weight in LatencyModel (one online sample: 1, decaying)


@dataclass
class LatencyModel:
    """T(N) = fixed + per_token * N seconds; `observe` refines both by least squares with
    the past's weight decaying by `decay` per new sample. The samples it was fitted on
    stay in for good at `ANCHOR_WEIGHT` each: online samples cluster at the few N a
    workload runs (a draft pass at B = 4 has 1-4 rows), and alone they fix the slope
    badly (a 2-point probe at 1 and 4 rows plus such passes gave 2.2 ms per row where
    the pass costs 0.6-0.9); online samples spread over N still outweigh them."""
    fixed: float
    per_token: float
    decay: float = 0.98
    _sums: list[float] = field(default_factory=lambda: [0.0] * 5)  # online: w, wN, wT, wNN, wNT
    _anchors: list[float] = field(default_factory=lambda: [0.0] * 5)  # fitted samples, never decayed

    @classmethod
    def fit(cls, samples: Sequence[tuple[int, float]], decay: float = 0.98) -> "LatencyModel":
        model = cls(0.0, 0.0, decay)
        for n, t in samples:
            _add(model._anchors, n, t, ANCHOR_WEIGHT)
        model._solve()
        return model

    def predict(self, num_tokens: int, num_sampled: int = 0, num_stochastic: int = 0) -> float:
        return max(self.fixed + self.per_token * num_tokens, 1e-6)

    def predict_many(self, num_tokens: np.ndarray, num_stochastic: np.ndarray) -> np.ndarray:
        """`predict` of each step size in `num_tokens`."""
        return np.maximum(self.fixed + self.per_token * num_tokens, 1e-6)

    def observe(self, num_tokens: int, seconds: float, num_sampled: int = 0, num_stochastic: int = 0) -> None:
        self._sums = [s * self.decay for s in self._sums]
        _add(self._sums, num_tokens, seconds)
        self._solve()

    def _solve(self) -> None:
        w, sn, st, snn, snt = (a + b for a, b in zip(self._sums, self._anchors))
        det = w * snn - sn * sn
        if w <= 0:
            return
        if abs(det) < 1e-12 * max(w * snn, 1.0):  # one distinct N so far: keep the slope
            self.fixed = st / w - self.per_token * sn / w
            return
        self.per_token = max((w * snt - sn * st) / det, 0.0)
        self.fixed = max((st - self.per_token * sn) / w, 0.0)


def _add(sums: list[float], n: int, t: float, w: float = 1.0) -> None:
    sums[0] += w
    sums[1] += w * n
    sums[2] += w * t
    sums[3] += w * n * n
    sums[4] += w * n * t


@dataclass(frozen=True)
class ContextCost:
    """Seconds a row's own context adds to a step: L * (per_token + per_query_token * q)
    for a row of q query tokens after L context tokens; `draft_per_token` x L to a model
    drafter's pass for each row it drafts for."""
    per_token: float = 0.0
    per_query_token: float = 0.0
    draft_per_token: float = 0.0

    def row(self, context: int, queries: int = 1) -> float:
        return context * (self.per_token + self.per_query_token * queries)

    @classmethod
    def fit(cls, rows: int, extra_context: int, queries: int, slow: tuple[float, float]) -> "ContextCost":
        """From the slowdowns (seconds) of a rows x 1 and a rows x `queries` step when each
        row's context grows by `extra_context` tokens."""
        one, many = (max(s, 0.0) / (rows * extra_context) for s in slow)
        per_query = max((many - one) / (queries - 1), 0.0) if queries > 1 else 0.0
        return cls(max(one - per_query, 0.0), per_query)


class LatencyTable:
    """T(N) of all-sampled steps, piecewise linear through (knots[i], times[i])."""

    def __init__(self, samples: Sequence[tuple[int, float]], ema: float = TABLE_EMA, sample_cost: float = 0.0,
                 scale_ema: float = SCALE_EMA):
        points = sorted(dict(samples).items())  # one time per N (the last given wins)
        if not points:
            raise ValueError("a latency table needs at least one measured step")
        self.knots = [n for n, _ in points]
        self.times = [t for _, t in points]  # the curve's shape: T(N) = scale x interpolated times
        self.scale = 1.0
        self.ema, self.scale_ema = ema, scale_ema
        self.sample_cost = sample_cost  # seconds per row sampled at a temperature (not argmax)
        self._monotone(0)

    def predict(self, num_tokens: int, num_sampled: int | None = None, num_stochastic: int = 0) -> float:
        return max(self.scale * self._shape(num_tokens), 1e-6) + self.sample_cost * num_stochastic

    def predict_many(self, num_tokens: np.ndarray, num_stochastic: np.ndarray) -> np.ndarray:
        """`predict` of each (step size, rows sampled at a temperature) pair, at once."""
        knots, times = np.array(self.knots, dtype=float), np.array(self.times)
        shape = np.interp(num_tokens, knots, times)  # below the first knot: its time
        if len(knots) > 1:  # past the last knot: the last segment's slope goes on
            slope = (times[-1] - times[-2]) / (knots[-1] - knots[-2])
            shape = np.where(num_tokens > knots[-1], times[-1] + slope * (num_tokens - knots[-1]), shape)
        return np.maximum(self.scale * shape, 1e-6) + self.sample_cost * num_stochastic

    def observe(self, num_tokens: int, seconds: float, num_sampled: int | None = None,
                num_stochastic: int = 0) -> None:
        if num_sampled is not None and num_sampled != num_tokens:
            return  # prefill tokens in the step: not the table's shape
        seconds -= self.sample_cost * num_stochastic  # the knots are greedy steps
        shape = max(self._shape(num_tokens), 1e-9)
        # One interrupted step (a VM pause) counts as at most SCALE_CLAMP times its prediction.
        ratio = min(max(seconds / (self.scale * shape), 1.0 / SCALE_CLAMP), SCALE_CLAMP)
        seconds = ratio * self.scale * shape
        self.scale *= 1.0 + self.scale_ema * (ratio - 1.0)
        if num_tokens > self.knots[-1]:
            return  # extrapolated: the last segment's slope is the probes'; the scale learnt it
        (i, wi), (j, wj) = self._weights(num_tokens)
        error = seconds / self.scale - shape  # in the knots' units
        self.times[i] += self.ema * wi * error
        self.times[j] += self.ema * wj * error
        self._monotone(min(i, j))

    def _shape(self, num_tokens: int) -> float:
        (i, wi), (j, wj) = self._weights(num_tokens)
        return wi * self.times[i] + wj * self.times[j]

    def _weights(self, n: int) -> tuple[tuple[int, float], tuple[int, float]]:
        """Interpolation (or, past either end, extrapolation) weights of the two knots
        around n: T(n) = wi * times[i] + wj * times[j]."""
        knots = self.knots
        if len(knots) == 1:
            return (0, 1.0), (0, 0.0)
        j = min(max(bisect.bisect_left(knots, n), 1), len(knots) - 1)
        i = j - 1
        f = (n - knots[i]) / (knots[j] - knots[i])
        if n < knots[0]:
            f = 0.0  # below the first knot: its time (a step costs at least that)
        return (i, 1.0 - f), (j, f)

    def _monotone(self, start: int) -> None:
        for k in range(max(start, 1), len(self.times)):
            self.times[k] = max(self.times[k], self.times[k - 1])


def describe(model: LatencyModel | LatencyTable) -> str:
    if isinstance(model, LatencyTable):
        shown = ", ".join(f"{n}: {model.scale * t * 1e3:.1f}" for n, t in zip(model.knots, model.times))
        return (f"latency table: T(N greedy tokens) in ms = {{{shown}}}, "
                f"+{model.sample_cost * 1e3:.3f} ms per row sampled at a temperature (scale {model.scale:.3f})")
    return f"latency model: T(N) = {model.fixed * 1e3:.2f} ms + {model.per_token * 1e3:.3f} ms x N tokens"


def fit_quality(model: LatencyModel | LatencyTable, samples: Sequence[tuple[int, float]]) -> float:
    """Root-mean-square relative error of the model on (N, T) samples."""
    errs = [(model.predict(n) - t) / t for n, t in samples if t > 0]
    return math.sqrt(sum(e * e for e in errs) / len(errs)) if errs else 0.0
