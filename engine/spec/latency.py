"""Step-latency models the draft controller prices its plans with.

`LatencyTable` is the target step's cost T(N, R) for a step of N tokens in R rows that
all sample (decodes and verifications: the steps a draft-length choice changes). Its
knots, measured at start-up (one timed forward pass per knot), lie on lines, one per
probed row count R: one row of 1 .. 1 + max_k tokens, then R = 2, 4, 8, ... up to the
batch, each at 1, 2 and 1 + max_k tokens a row (its plain decode, one draft a row, every
draft). Each line is a piecewise-linear curve in N, so it follows whatever shape the
kernels give it (on the native CPU path one row runs as a GEMV and two or more as GEMM
tiles, a jump of ~60% from N = 1 to N = 2); beyond its last knot the curve goes on with
the last segment's slope, and knot times are kept non-decreasing in N. A step of R rows
is priced at N / R tokens a row on the two lines around R, linearly in R between them.

Why lines: at equal N, more and shorter rows cost more (probes on this CPU's fp32 path:
72 x 2 tokens in 306 ms against 16 x 9 in 255; 64 x 1 in 201 against 32 x 2 in 165). A
table of N alone, probed as rows of 2 past batch 1, priced a B = 16 verification of 8
drafts each (N = 144 in 16 rows) as 72 rows, 25% high, and B = 16's plain decode as 8
rows, low: adaptive drafted k ~6 where fixed k = 8 ran 1.14x of no drafts. A row cost at
equal N fitted on top of that table (probes of 2-16 rows x 9 against the rows of 2) fixed
B = 16 but priced B = 64's plain decode 15% high (its knot at N = 64 was 32 rows of 2,
and the cost of a row is not one constant), and B = 64 drafted at 0.85x of no drafts. On
lines, the plain decode step and a full verification of the engine's batch are probed as
they run. A table built without rows is one curve of N alone (the unit tests' tables).

Online, every step whose tokens all sampled is learnt from in two parts: a scale shared
by all knots moves towards the step's measured / predicted time (SCALE_EMA), then the
knots around it (the two around its tokens a row on each of the two lines around its
rows) take a slower share of what the scaled table still misses (TABLE_EMA, split by
the interpolation weights). Steps with prefill tokens are not of
the table's shape and are skipped. A workload visits a few N (its plain decode step
most), and with the knots learnt alone the visited ones moved with the VM while the
rest kept their probe times: a draft model's grounded B = 4 run learnt its plain step
at 71 ms against a 50 ms probe while the drafting steps' knots stayed at the probes,
so the two plans were priced from different minutes of the machine. The shared scale
carries a drift of the whole machine to every knot; the knots' own learning is left
with what differs by shape.

That holds for plain steps (a token a row) of a stream without drafts. A step with drafts
teaches its drafts' knots first (not the plain knots at a token a row), as a
least-squares running mean of the steps each has seen, its probe counted as
PROBE_WEIGHT of them (at least DRAFT_EMA a step after), and the scale only what they
leave, weighted by the plain step's share of the step. A probe's error is the knot's
own, and the plain step is the price every plan is weighed against: learnt in the scale,
a drafting shape's excess raised the plain step's price with it and kept the drafts
looking cheap (the q8 self-draft, open chat B = 16: 24 drafting steps in a row ran
10-15% over their price while the plain step's rose from 62 to 77 ms against ~58
measured; adaptive ran at 0.966x of no drafts). A plain step within CONTRAST_STEPS learnt
steps of one with drafts teaches its plain knots the same way: beside drafting steps
its error is its shape's, not the machine's (one server's probe priced 16 plain rows at
68.7 ms beside 50.6 in the next server; it drafted at B = 16 and ran 0.89x of no drafts).
The controller takes such a plain step now and then while its drafts pay little
(`PLAIN_CHECK_AFTER`).

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

Both answer `predict(num_tokens, num_sampled, num_stochastic, rows)` and
`observe(num_tokens, seconds, num_sampled, num_stochastic, rows)`; `num_sampled` only
tells the table which steps to learn from; `LatencyModel` ignores `rows`. The table's knots are greedy steps
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
DRAFT_EMA = 0.1  # the least weight of one step with drafts in the knots around its shape
PROBE_WEIGHT = 1.0  # a knot's probe counts as this many steps of its shape (a running mean after it)
CONTRAST_STEPS = 2  # a plain step within this many learnt steps of one with drafts is learnt as its own shape
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

    def predict(self, num_tokens: int, num_sampled: int = 0, num_stochastic: int = 0,
                rows: int | None = None) -> float:
        return max(self.fixed + self.per_token * num_tokens, 1e-6)

    def predict_many(self, num_tokens: np.ndarray, num_stochastic: np.ndarray, rows: int | None = None) -> np.ndarray:
        """`predict` of each step size in `num_tokens`."""
        return np.maximum(self.fixed + self.per_token * num_tokens, 1e-6)

    def observe(self, num_tokens: int, seconds: float, num_sampled: int = 0, num_stochastic: int = 0,
                rows: int | None = None) -> None:
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


class _Curve:
    """One piecewise-linear T(N) through (knots[i], times[i]): below the first knot its time,
    past the last the last segment's slope goes on; times kept non-decreasing in N."""

    def __init__(self, points: Sequence[tuple[int, float]]):
        points = sorted(dict(points).items())  # one time per N (the last given wins)
        self.knots = [n for n, _ in points]
        self.times = [t for _, t in points]
        self.visits = [0.0] * len(points)  # steps learnt at each knot (by their weights)
        self.monotone(0)

    def weights(self, n: float) -> tuple[tuple[int, float], tuple[int, float]]:
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

    def at(self, n: float) -> float:
        (i, wi), (j, wj) = self.weights(n)
        return wi * self.times[i] + wj * self.times[j]

    def at_many(self, n: np.ndarray) -> np.ndarray:
        knots, times = np.array(self.knots, dtype=float), np.array(self.times)
        out = np.interp(n, knots, times)
        if len(knots) > 1:
            slope = (times[-1] - times[-2]) / (knots[-1] - knots[-2])
            out = np.where(n > knots[-1], times[-1] + slope * (n - knots[-1]), out)
        return out

    def learn(self, n: float, error: float, weight: float, rate: float, mean: bool = False,
              keep_first: bool = False) -> None:
        """Move the two knots around n by their weights x `weight` (the line's) x rate x error
        (not past the last knot: there the curve is extrapolated). `mean`: as a least-squares
        running mean, at 1 / (PROBE_WEIGHT + their squared weights so far) while that exceeds
        `rate`; `keep_first`: the first knot (the plain step, a token a row) stays."""
        if n > self.knots[-1]:
            return
        around = self.weights(n)
        for i, w in around:
            share = weight * w
            if not share or (keep_first and i == 0):
                continue
            r = rate
            if mean:
                self.visits[i] += share * share
                r = max(rate, 1.0 / (PROBE_WEIGHT + self.visits[i]))
            self.times[i] += r * share * error
        self.monotone(around[0][0])

    def monotone(self, start: int) -> None:
        for k in range(max(start, 1), len(self.times)):
            self.times[k] = max(self.times[k], self.times[k - 1])


class LatencyTable:
    """T(N, rows) of all-sampled steps: one `_Curve` in N per probed row count (a line). A
    step of R rows and N tokens (N / R a row) is priced on the two lines around R at the
    same tokens per row, linearly in R between them (past the last line, the last two
    lines' slope in R goes on). Without `rows` (or with one line: probes without KV room for
    two row counts) the table is one curve of N alone, whatever rows a step has."""

    def __init__(self, samples: Sequence[tuple[int, float]], ema: float = TABLE_EMA, sample_cost: float = 0.0,
                 scale_ema: float = SCALE_EMA, rows: Sequence[int] | None = None):
        """samples: (N, seconds) of each probe; rows: each probe's rows (None: one curve)."""
        if not samples:
            raise ValueError("a latency table needs at least one measured step")
        by_rows: dict[int, list[tuple[int, float]]] = {}
        for (n, t), r in zip(samples, [0] * len(samples) if rows is None else rows):
            by_rows.setdefault(r, []).append((n, t))
        self.lines = sorted(by_rows)  # probed row counts; [0]: the table of N alone
        self.curves = [_Curve(by_rows[r]) for r in self.lines]
        self.scale = 1.0  # shared by every knot: T = scale x the curves
        self._since_drafts = CONTRAST_STEPS  # learnt steps since the last with drafts (at most this)
        self.ema, self.scale_ema = ema, scale_ema
        self.sample_cost = sample_cost  # seconds per row sampled at a temperature (not argmax)

    @property
    def knots(self) -> list[int]:
        """Every knot's N, over all lines."""
        return sorted({n for c in self.curves for n in c.knots})

    @property
    def times(self) -> list[float]:
        """The knots' times of a table of N alone."""
        return self.curves[0].times

    def _around(self, rows: int | None) -> list[tuple[int, float, float]]:
        """(line index, weight, factor) of the lines a step of N tokens in `rows` rows is
        priced on, each at N x factor tokens on its line: the two lines around `rows` at the
        step's tokens a row (factor = line / rows). A table of one line prices every step on
        it at its N (factor 1): no second line gives a slope in R."""
        lines = self.lines
        if len(lines) == 1:
            return [(0, 1.0, 1.0)]
        r = 1 if rows is None else rows
        j = min(max(bisect.bisect_left(lines, r), 1), len(lines) - 1)
        f = max((r - lines[j - 1]) / (lines[j] - lines[j - 1]), 0.0)  # below the first line: it alone
        return [(j - 1, 1.0 - f, lines[j - 1] / (rows or 1)), (j, f, lines[j] / (rows or 1))]

    def _shape(self, num_tokens: int, rows: int | None) -> float:
        """Unscaled T of `num_tokens` in `rows` rows (None: one row)."""
        return sum(w * self.curves[i].at(num_tokens * x) for i, w, x in self._around(rows) if w)

    def predict(self, num_tokens: int, num_sampled: int | None = None, num_stochastic: int = 0,
                rows: int | None = None) -> float:
        return max(self.scale * self._shape(num_tokens, rows), 1e-6) + self.sample_cost * num_stochastic

    def predict_many(self, num_tokens: np.ndarray, num_stochastic: np.ndarray, rows: int | None = None) -> np.ndarray:
        """`predict` of each (step size, rows sampled at a temperature) pair, at once, all of `rows` rows."""
        tokens = np.asarray(num_tokens, dtype=float)
        shape = sum(w * self.curves[i].at_many(tokens * x) for i, w, x in self._around(rows) if w)
        return np.maximum(self.scale * shape, 1e-6) + self.sample_cost * num_stochastic

    def observe(self, num_tokens: int, seconds: float, num_sampled: int | None = None,
                num_stochastic: int = 0, rows: int | None = None) -> None:
        if num_sampled is not None and num_sampled != num_tokens:
            return  # prefill tokens in the step: not the table's shape
        seconds -= self.sample_cost * num_stochastic  # the knots are greedy steps
        shape = max(self._shape(num_tokens, rows), 1e-9)
        # One interrupted step (a VM pause) counts as at most SCALE_CLAMP times its prediction.
        ratio = min(max(seconds / (self.scale * shape), 1.0 / SCALE_CLAMP), SCALE_CLAMP)
        seconds = ratio * self.scale * shape
        around = self._around(rows)
        beyond = any(w < 0 for _, w, _ in around)  # more rows than the last line: extrapolated in R
        drafts = rows is not None and num_tokens > rows and self.lines != [0]
        contrast = drafts or (rows is not None and self._since_drafts < CONTRAST_STEPS)
        self._since_drafts = 0 if drafts else min(self._since_drafts + 1, CONTRAST_STEPS)
        if contrast and not beyond:
            self._learn_own(num_tokens, seconds, rows, around, drafts)
            return
        self.scale *= 1.0 + self.scale_ema * (ratio - 1.0)
        if beyond:
            return  # the scale learnt it
        error = seconds / self.scale - shape  # in the knots' units
        for i, w, x in around:
            if w:
                self.curves[i].learn(num_tokens * x, error, w, self.ema)

    def _learn_own(self, num_tokens: int, seconds: float, rows: int,
                   around: list[tuple[int, float, float]], drafts: bool) -> None:
        """A step of its shape's own: one with drafts (its drafts' knots, not the plain ones)
        or a plain one beside it (its plain knots). They learn first, as a running mean from
        their probe; then the scale learns what they leave, weighted by the plain step's
        share of the step."""
        error = seconds / self.scale - self._shape(num_tokens, rows)
        for i, w, x in around:
            if w:
                self.curves[i].learn(num_tokens * x, error, w, DRAFT_EMA, mean=True, keep_first=drafts)
        shape = max(self._shape(num_tokens, rows), 1e-9)
        plain = min(self._shape(rows, rows) / shape, 1.0)
        self.scale *= 1.0 + self.scale_ema * plain * (seconds / (self.scale * shape) - 1.0)


def describe(model: LatencyModel | LatencyTable) -> str:
    if isinstance(model, LatencyTable):
        lines = []
        for rows, curve in zip(model.lines, model.curves):
            shown = ", ".join(f"{n}: {model.scale * t * 1e3:.1f}" for n, t in zip(curve.knots, curve.times))
            lines.append(f"{{{shown}}}" if rows == 0 else f"{rows} rows: {{{shown}}}")
        return (f"latency table: T(N greedy tokens) in ms = {'; '.join(lines)}, "
                f"+{model.sample_cost * 1e3:.3f} ms per row sampled at a temperature (scale {model.scale:.3f})")
    return f"latency model: T(N) = {model.fixed * 1e3:.2f} ms + {model.per_token * 1e3:.3f} ms x N tokens"


def fit_quality(model: LatencyModel | LatencyTable, samples: Sequence[tuple[int, float]]) -> float:
    """Root-mean-square relative error of the model on (N, T) samples."""
    errs = [(model.predict(n) - t) / t for n, t in samples if t > 0]
    return math.sqrt(sum(e * e for e in errs) / len(errs)) if errs else 0.0
