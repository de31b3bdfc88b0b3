"""The step-latency table prices a step by its rows as well as its tokens (engine/spec/latency.py).

At equal N, more and shorter rows cost more on this CPU, so the table keeps one line of
knots per probed row count. Probe costs here follow T = 57 ms + 1.67 ms x N + 1.77 ms x
rows (a fit to a grid of probes on this CPU's fp32 path) and a draft pass costs 12 ms +
1.8 ms a row.
"""
from __future__ import annotations

import random

import pytest

import engine.spec.controller as controller
import engine.spec.decoder as decoder
from engine.spec import DraftController, LatencyModel
from engine.spec.decoder import measure_step_latency, probe_shapes
from engine.spec.latency import LatencyTable, describe
from tests.unit.test_spec_context import simulate

FIXED, PER_TOKEN, PER_ROW = 0.057, 0.00167, 0.00177
PASS = LatencyModel(0.012, 0.0018)


def cost(rows: int, tokens: int) -> float:
    return FIXED + PER_TOKEN * tokens + PER_ROW * rows


def probed_table(monkeypatch, max_rows: int, shapes=None) -> LatencyTable:
    """The start-up table of an engine of `max_rows` rows whose steps cost `cost`."""
    clock = [0.0]

    def probe(rows, per_row, temperature):
        clock[0] += cost(rows, rows * per_row)
        return True
    monkeypatch.setattr(decoder.time, "perf_counter", lambda: clock[0])
    return measure_step_latency(probe, shapes or probe_shapes(8, max_rows * 9, max_rows))


def rows_of_two(max_tokens: int) -> list[tuple[int, int]]:
    """The probes before row lines: one row up to 9 tokens, then rows of 2 at ~1.5x steps."""
    shapes, target = [(1, n) for n in range(1, 10)], 9.0
    while target < max_tokens:
        target = min(target * 1.5, max_tokens)
        if int(target) // 2 * 2 > shapes[-1][0] * shapes[-1][1]:
            shapes.append((int(target) // 2, 2))
    return shapes


def test_probes_cover_each_row_count_at_1_2_and_all_drafts_a_row():
    shapes = probe_shapes(8, 144, 16)
    assert [s for s in shapes if s[0] == 1] == [(1, n) for n in range(1, 10)]
    assert {s for s in shapes if s[0] > 1} == {(r, q) for r in (2, 4, 8, 16) for q in (1, 2, 9)}
    assert [s[0] * s[1] for s in shapes] == sorted(s[0] * s[1] for s in shapes)  # by tokens
    assert (48, 1) in probe_shapes(8, 96, 48) and (48, 9) not in probe_shapes(8, 96, 48)  # within max tokens
    assert {q for _, q in probe_shapes(1, 128, 64)} == {1, 2}


def test_the_table_prices_each_step_at_its_rows_between_the_probed_lines(monkeypatch):
    """B = 16's plain decode and full verification are probed as they run; 12 rows lie
    between the 8- and 16-row lines (exact here: the cost is linear in rows); a
    one-dimensional table of the same engine (rows of 2 past batch 1) prices B = 16 at
    k = 8 as 72 rows of 2 (+25%) and its plain decode as 8 rows of 2."""
    table = probed_table(monkeypatch, 16)
    assert table.lines == [1, 2, 4, 8, 16]
    for rows, tokens in ((16, 144), (16, 16), (1, 9), (12, 12), (12, 60), (16, 80), (3, 27), (1, 1)):
        assert table.predict(tokens, tokens, 0, rows) == pytest.approx(cost(rows, tokens), rel=1e-9), (rows, tokens)
    assert "16 rows: {16: " in describe(table)
    flat = probed_table(monkeypatch, 16, rows_of_two(144))
    legacy = LatencyTable([(n, flat.predict(n, rows=r)) for r, n in ((r, r * q) for r, q in rows_of_two(144))])
    assert legacy.predict(144, 144, 0, 16) == pytest.approx(cost(72, 144)) and cost(72, 144) > 1.24 * cost(16, 144)
    assert legacy.predict(16, 16, 0, 16) == pytest.approx(cost(8, 16))


def test_the_table_learns_a_step_on_the_lines_around_its_rows():
    """A step that ran as its rows predict moves nothing. A plain step (a token a row) of a
    stream without drafts, slower than predicted, moves the scale 10% of the way and the
    one-token knots of the two lines around its rows a little; a step with drafts moves
    the knots of those lines at its tokens a row first, then the scale a little, and so
    does a plain step right after it (its one-token knots); none moves a line beyond them."""
    shapes = [(r, q) for r in (1, 4, 8, 16) for q in (1, 2, 9)]
    table = LatencyTable([(r * q, cost(r, r * q)) for r, q in shapes], rows=[r for r, _ in shapes])
    table.observe(12, cost(12, 12), 12, 0, 12)
    assert table.scale == 1.0 and table.predict(12, rows=12) == pytest.approx(cost(12, 12))
    one_row = list(table.curves[0].times)
    table.observe(12, 1.5 * cost(12, 12), 12, 0, 12)
    assert table.scale == pytest.approx(1.05) and table.curves[0].times == one_row
    assert table.curves[2].times[0] > cost(8, 8) and table.curves[3].times[0] > cost(16, 16)
    scale, two = table.scale, (table.curves[2].times[1], table.curves[3].times[1])
    table.observe(24, 1.5 * table.predict(24, rows=12), 24, 0, 12)
    assert table.curves[0].times == one_row
    assert table.curves[2].times[1] > two[0] and table.curves[3].times[1] > two[1]  # 2 tokens a row
    assert scale < table.scale < scale * 1.03  # it takes what the knots leave
    scale, plain = table.scale, (table.curves[2].times[0], table.curves[3].times[0])
    table.observe(12, 0.8 * table.predict(12, rows=12), 12, 0, 12)  # beside a step with drafts
    assert table.curves[2].times[0] < 0.97 * plain[0] and table.curves[3].times[0] < 0.97 * plain[1]
    assert scale * 0.98 < table.scale < scale  # (a stream without drafts: 2% of its 20%)
    last = list(table.curves[3].times)
    table.observe(32, 1.5 * table.predict(32, rows=32), 32, 0, 32)  # past the last line: the scale only
    assert table.scale > scale and table.curves[3].times == last


def test_a_table_of_n_alone_ignores_rows():
    """So does a table of one line (no KV room to probe a second row count): 9 tokens in 9
    rows are priced as 9 tokens, not as the one-row step of 1 token each would be."""
    table = LatencyTable([(1, 0.05), (9, 0.07), (144, 0.3)])
    assert table.predict(144, rows=16) == table.predict(144, rows=72) == pytest.approx(0.3)
    one_line = LatencyTable([(1, 0.05), (2, 0.06), (9, 0.07)], rows=[1, 1, 1])
    assert one_line.predict(9, rows=9) == pytest.approx(0.07)


def true_goodput(batch: int, k: int, gains: list[float]) -> float:
    """Committed tokens a second of every row drafting k, at the true costs."""
    committed = batch * (1.0 + sum(gains[:k]))
    return committed / (cost(batch, batch * (1 + k)) + k * PASS.predict(batch))


def test_the_controller_drafts_as_deep_as_pays_at_the_true_costs_at_batch_16(monkeypatch):
    """16 requests whose drafts 1-7 are always accepted and the 8th never: the plan from the
    table with row lines is the uniform k with the best goodput at the true costs; from a
    table of N alone probed as rows of 2 the plan stops short (the verification looks 25%
    dearer)."""
    plans = {}
    for lines in (True, False):
        table = probed_table(monkeypatch, 16, None if lines else rows_of_two(144))
        if not lines:
            table = LatencyTable([(n, t) for c in table.curves for n, t in zip(c.knots, c.times)])
        ctl = DraftController(8, table, draft_latency=LatencyModel(0.012, 0.0018))
        ids = [f"r{i}" for i in range(16)]
        for _ in range(20):
            for rid in ids:
                ctl.observe(rid, 8, 7)
        for _ in range(3):  # hysteresis settles
            plan = ctl.choose(dict.fromkeys(ids, 8), 0)
        assert len(set(plan.values())) == 1
        plans[lines] = plan["r0"]
        gains = ctl.accept.gains("r0", 8, 0.0, None, ctl.accept.continuations())
    best = max(range(9), key=lambda k: true_goodput(16, k, gains))
    assert plans[True] == best == 7
    assert plans[False] < best and true_goodput(16, plans[False], gains) < 0.99 * true_goodput(16, best, gains)


def warm_up(ctl: DraftController, rate: float) -> None:
    """30 verifications of 8 drafts, each accepted with `rate` after the drafts before it."""
    rnd = random.Random(1)
    for _ in range(30):
        ctl.observe("warm-up", 8, next(a for a in range(9) if a == 8 or rnd.random() >= rate))


def test_steps_with_drafts_dearer_than_probed_teach_their_knots_not_the_plain_steps_price(monkeypatch):
    """16 rows whose drafts are accepted at 0.96, where the drafts' share of a step costs 3x
    what the probes said (beyond the plain step, which costs what they said): drafting does
    not pay at that price. Every step drafts at first, so the table only hears of steps with
    drafts. Learnt in the shared scale, their excess raised the plain step's price with them
    (1.8x its true cost after 100 steps) and every step drafted; learnt in their own knots, the
    plain step keeps its price and the drafts stop within a few steps. (The q8 self-draft at
    open chat B = 16: 24 drafting steps in a row ran 10-15% over their price, the plain step's
    price rose from 62 to 77 ms against ~58 measured, and adaptive ran at 0.966x of no drafts.)"""
    table = probed_table(monkeypatch, 16)
    ctl = DraftController(8, table, draft_latency=LatencyModel(PASS.fixed, PASS.per_token))
    warm_up(ctl, 0.96)
    plans = simulate(ctl, 0.96, 16, 100, context=0, pass_seconds=PASS.predict,
                     step_seconds=lambda n: cost(16, 16) + 3 * (cost(16, n) - cost(16, 16)))
    assert plans[0] > 0 and sum(1 for k in plans if k) <= 10
    assert table.predict(16, rows=16) == pytest.approx(cost(16, 16), rel=0.05)


@pytest.mark.parametrize("checks", [True, False])
def test_a_plain_step_priced_high_by_its_probe_is_checked_while_drafts_pay_little(monkeypatch, checks):
    """16 rows whose drafts are accepted at 0.5: at the true costs drafting does not pay,
    but the probe of 16 plain rows read 1.4x its cost (one server's read 68.7 ms, the next
    one's 50.6), so the drafts look like a gain of a few percent. Steps with drafts do not
    teach the plain step's price; a plain step every PLAIN_CHECK_AFTER + 1 steps does, and
    drafting stops after a check or two. Without the checks every step drafts."""
    if not checks:
        monkeypatch.setattr(controller, "PLAIN_CHECK_AFTER", 10 ** 9)
    shapes = [(r, q) for r in (1, 2, 4, 8, 16) for q in (1, 2, 9)]
    table = LatencyTable([(r * q, cost(r, r * q) * (1.4 if (r, q) == (16, 1) else 1.0)) for r, q in shapes],
                         rows=[r for r, _ in shapes])
    ctl = DraftController(8, table, draft_latency=LatencyModel(PASS.fixed, PASS.per_token))
    warm_up(ctl, 0.5)
    plans = simulate(ctl, 0.5, 16, 100, context=0, step_seconds=lambda n: cost(16, n), pass_seconds=PASS.predict)
    drafting = sum(1 for k in plans if k)
    if checks:
        assert 0 < drafting <= 2 * controller.PLAIN_CHECK_AFTER
        assert table.predict(16, rows=16) == pytest.approx(cost(16, 16), rel=0.05)
    else:
        assert drafting == 100


def test_the_sampling_cost_is_probed_on_a_step_of_at_most_144_tokens(monkeypatch):
    """At B = 64 the largest knot is 64 rows x 9 (576 tokens, ~1 s a run on this CPU's fp32
    path): the 8 runs of the sampling-cost probe go to the largest knot within 144 tokens
    instead (16 x 9 here), and still read the cost per sampled token."""
    clock, sampled = [0.0], []

    def probe(rows, per_row, temperature):
        n = rows * per_row
        clock[0] += cost(rows, n) + (0.0003 * n if temperature > 0 else 0.0)
        if temperature > 0:
            sampled.append((rows, per_row))
        return True
    monkeypatch.setattr(decoder.time, "perf_counter", lambda: clock[0])
    table = measure_step_latency(probe, probe_shapes(8, 576, 64))
    assert max(table.knots) == 576
    assert set(sampled) == {(16, 9)} and len(sampled) == 4
    assert table.sample_cost == pytest.approx(0.0003, rel=1e-6)
    # With no knot within 144 tokens, the smallest one.
    sampled.clear()
    table = measure_step_latency(probe, [(64, 4), (64, 9)])
    assert set(sampled) == {(64, 4)} and table.sample_cost == pytest.approx(0.0003, rel=1e-6)
