"""The adaptive controller prices each row's own context (ContextCost) and explores when
nothing is drafted. Figures are this CPU's fp32 path with the q8 self-draft, as the
start-up probes measured them."""
from __future__ import annotations

import random

import pytest

from engine.request import Request
from engine.sampling_params import SamplingParams
from engine.sched.output import ScheduledRequest
from engine.spec import DraftController, LatencyModel, create_drafter
from engine.spec.controller import (EXPLORE_AFTER, EXPLORE_BACKLOG, EXPLORE_FIRST, EXPLORE_GUESS_DEPTH, EXPLORE_OPTIMISM,
                                    EXPLORE_SOON, StepRows)
from engine.spec.decoder import SpeculativeDecoder
from engine.spec.latency import ContextCost, LatencyTable

MEASURED = ContextCost(3.2e-6, 0.82e-6, 3.8e-6)  # per own context token of a row: step, per query, draft pass


def fp32_table(ema: float = 0.1) -> LatencyTable:
    ms = {1: 36.4, 9: 46.6, 12: 49.9, 20: 58.4, 30: 68.3, 44: 90.6, 68: 117.8, 102: 149.8, 144: 198.9}
    return LatencyTable([(n, t / 1e3) for n, t in ms.items()], ema=ema)


def fresh_q8_self_draft(context: ContextCost = MEASURED) -> DraftController:
    return DraftController(8, fp32_table(), draft_latency=LatencyModel(0.0081, 0.00064), context=context)


def q8_self_draft(context: ContextCost = MEASURED) -> DraftController:
    ctl = fresh_q8_self_draft(context)
    for _ in range(30):
        ctl.observe("warm-up", 8, 8)
    return ctl


def test_context_cost_fit_recovers_both_rates():
    rows, extra, q = 16, 256, 9
    true = ContextCost(3e-6, 0.8e-6)
    slow = (rows * true.row(extra, 1), rows * true.row(extra, q))
    fit = ContextCost.fit(rows, extra, q, slow)
    assert fit.per_token == pytest.approx(3e-6) and fit.per_query_token == pytest.approx(0.8e-6)
    assert ContextCost.fit(rows, extra, q, (-0.001, -0.002)) == ContextCost()  # noise: never negative


@pytest.mark.parametrize("batch, context, drafts", [(1, 1000, 8), (16, 300, 128), (16, 1000, 0)])
def test_long_contexts_make_drafts_dearer_at_large_batch(batch, context, drafts):
    """At B = 16 a draft's context costs 300 x (0.82 + 3.8) us = 1.4 ms at 300 tokens and 4.6
    ms at 1000, beside ~1.3 ms of verify and draft-pass rows: at 1000 tokens drafting 8 per
    row no longer pays; at B = 1 it still pays many times over. Unpriced, every case drafts."""
    ids = [f"r{i}" for i in range(batch)]
    plan = q8_self_draft().choose(dict.fromkeys(ids, 8), 0, StepRows(contexts=dict.fromkeys(ids, context)))
    assert sum(plan.values()) == drafts
    unpriced = q8_self_draft(ContextCost()).choose(dict.fromkeys(ids, 8), 0,
                                                   StepRows(contexts=dict.fromkeys(ids, context)))
    assert sum(unpriced.values()) == 8 * batch


def test_plain_decodes_contexts_count_in_the_step():
    """Plain decodes' contexts are owed whatever k is: a step made dearer by them makes
    the drafts' cost a smaller share, so more of them pay (16 candidates at 1000 tokens
    draft nothing alone, and draft beside 48 plain decodes of 2000 tokens' context)."""
    ids = [f"r{i}" for i in range(16)]
    ctx = dict.fromkeys(ids, 1000)
    assert sum(q8_self_draft().choose(dict.fromkeys(ids, 8), 0, StepRows(contexts=ctx)).values()) == 0
    others = {f"o{i}": 2000 for i in range(48)}
    assert sum(q8_self_draft().choose(dict.fromkeys(ids, 8), 48, StepRows(contexts={**ctx, **others})).values()) > 0


def test_the_table_and_the_pass_line_learn_without_the_contexts_share():
    """A step of 16 decodes after 300 tokens each runs at the table's T(16) plus their
    contexts' cost; the knots (greedy rows after a shared context) must not take that in,
    nor the draft-pass line what its rows' contexts cost."""
    ctl = DraftController(8, fp32_table(ema=1.0), draft_latency=LatencyModel(0.0081, 0.00064), context=MEASURED)
    decoder = SpeculativeDecoder(create_drafter("ngram"), ctl)
    reqs = [Request(f"r{i}", list(range(301)), SamplingParams(max_tokens=8)) for i in range(16)]
    scheduled = [ScheduledRequest(r, 300, 1, (), True) for r in reqs]
    t16 = ctl.latency.predict(16)
    decoder.observe(scheduled, {r.request_id: 1 for r in reqs}, 16, t16 + 16 * MEASURED.row(300))
    assert ctl.latency.predict(16) == pytest.approx(t16)
    d16 = ctl.draft_latency.predict(16)
    for _ in range(20):
        ctl.observe_draft_pass(16, 16, d16 + 16 * 300 * MEASURED.draft_per_token, context=16 * 300)
    assert ctl.draft_latency.predict(16) == pytest.approx(d16)


def simulate(ctl: DraftController, acceptance, batch: int, steps: int, backlog: float | None = None,
             context: int = 300, step_seconds=None, pass_seconds=None, source: int | None = None) -> list[int]:
    """Drafts planned per step when draft j is accepted with acceptance[j - 1] after drafts
    1..j-1 were (a float: the same at every position); `backlog`: a draft model's
    catch-up per future token of every request; `context`: every row's own context tokens;
    `step_seconds(tokens)` (with `pass_seconds(rows)` of each draft pass): each step's true
    time, which the controller's models learn as the decoder would report it (none: not timed);
    `source`: every proposal's source (`Proposal.source`; none: unnamed)."""
    rates = [acceptance] * 8 if isinstance(acceptance, float) else acceptance
    rnd, ids, planned = random.Random(0), [f"r{i}" for i in range(batch)], []
    catchup = {} if backlog is None else dict.fromkeys(ids, backlog)
    sources = {} if source is None else dict.fromkeys(ids, source)
    for _ in range(steps):
        plan = ctl.choose(dict.fromkeys(ids, 8), 0, StepRows(catchup=catchup, contexts=dict.fromkeys(ids, context),
                                                             sources=sources))
        planned.append(sum(plan.values()))
        if step_seconds is not None:
            for j in range(max(plan.values())):
                rows = sum(1 for k in plan.values() if k > j)
                ctl.observe_draft_pass(rows, rows, pass_seconds(rows))
            ctl.latency.observe(batch + planned[-1], step_seconds(batch + planned[-1]), batch + planned[-1], 0, batch)
        for rid, k in plan.items():
            accepted = 0
            while accepted < k and rnd.random() < rates[accepted]:
                accepted += 1
            ctl.observe(rid, k, accepted, source)
    return planned


def test_a_drafter_a_warm_up_wrote_off_is_explored_and_drafted_again():
    """A warm-up of a few short runs leaves the rates low; at B = 16 that prices drafts
    out, and without exploration nothing would ever test them again. After EXPLORE_AFTER
    steps without drafts 4 requests draft 8 each, ~97% are accepted, and the controller
    keeps drafting."""
    ctl = fresh_q8_self_draft()
    for accepted in (2, 3, 1, 8, 2):
        ctl.observe("warm-up", 8, accepted)
    planned = simulate(ctl, 0.97, 16, 200)
    assert not any(planned[:EXPLORE_AFTER - 1])
    assert planned[EXPLORE_AFTER - 1] > 0
    assert sum(1 for n in planned if n) > 150


def test_continuation_rates_a_warm_up_left_low_are_explored_from_shallow_drafts():
    """Runs that all stopped after the first draft leave the continuation rates low: at
    B = 16 only k = 1 pays, and k = 1 tests no continuation. After EXPLORE_AFTER such
    steps 4 requests draft 8 each; far more are accepted than expected, so another
    exploration follows EXPLORE_SOON steps later, and the continuation rates come up.
    (12 such runs: after 6 the first draft's rate, ~0.84, leaves k = 1 under DRAFT_MARGIN.)"""
    ctl = fresh_q8_self_draft()
    for _ in range(12):
        ctl.observe("warm-up", 8, 1)
    low = ctl.accept.hazard(4)
    planned = simulate(ctl, 0.97, 16, 200)
    assert 0 < max(planned[:EXPLORE_AFTER - 1]) <= 16  # k <= 1 each
    explored = [i for i, n in enumerate(planned) if n > 16]
    assert explored[:2] == [EXPLORE_AFTER - 1, EXPLORE_AFTER - 1 + EXPLORE_SOON]  # surprised: soon again
    # Each position rests on the few tries the explorations gave it (one miss at 0.97 moves
    # it by ~0.1); their pooled rate on all of them.
    assert low < 0.6 and ctl.accept.pooled() > 0.9 and min(ctl.accept.hazard(j) for j in range(2, 9)) > 0.7


def test_a_hopeless_drafter_is_explored_once_its_misses_have_faded_then_ever_more_rarely():
    """40 verifications that accepted nothing: drafting is not planned, and while those
    misses are fresh even their upper estimates say exploring cannot pay (with every draft
    taken as accepted, this explored 4 rows x 8 drafts 32, 96 and 224 steps in). Untested
    rates fade, so explorations come once they rest on few tries, ever further apart, and
    then the first-draft rate is a guess again: 4 rows draft EXPLORE_GUESS_DEPTH each."""
    ctl = q8_self_draft()
    for _ in range(40):
        ctl.observe("warm-up", 8, 0)
    planned = simulate(ctl, 0.0, 16, 1500)
    explored = [i for i, n in enumerate(planned) if n]
    assert explored and explored[0] > 8 * EXPLORE_AFTER
    gaps = [b - a for a, b in zip(explored, explored[1:])]
    assert len(gaps) >= 2 and gaps == sorted(gaps) and gaps[0] >= EXPLORE_AFTER
    assert max(planned) == 4 * EXPLORE_GUESS_DEPTH


def test_well_tried_rates_that_do_not_pay_are_not_explored():
    """B = 16 at 1000 tokens of context each with the q8 self-draft accepting 97%: no k
    pays, and 30 runs of 8 accepted drafts leave nothing to learn. Gated on perfect
    acceptance, explorations of 4 x 8 drafts came after 32, 96 and 224 steps and were all
    accepted as expected; on the rates' upper estimates none comes in 300 steps."""
    assert sum(simulate(q8_self_draft(), 1.0, 16, 300, backlog=0.5, context=1000)) == 0


def test_nothing_is_explored_where_even_perfect_drafts_would_not_pay():
    """A draft pass as dear as a target step: no k pays at any acceptance, so none is tried."""
    step = LatencyModel(0.05, 0.001)
    ctl = DraftController(8, step, draft_latency=LatencyModel(step.fixed, step.per_token))
    assert sum(simulate(ctl, 0.97, 4, 100)) == 0


FIRST_ONLY = [0.97] + [0.0] * 7  # a drafter whose first draft is right and the rest never


def shallow_drafter() -> DraftController:
    """B = 4 at a cheap draft pass: the first draft pays; deeper ones would if accepted."""
    ctl = DraftController(8, LatencyModel(0.05, 0.003), draft_latency=LatencyModel(0.004, 0.0005))
    for _ in range(10):
        ctl.observe("warm-up", 8, 1)
    return ctl


def test_exploration_waits_double_when_deeper_drafts_keep_missing():
    """First drafts accepted, later ones never: explorations 32, 64, 128, ... steps apart
    (each one's misses double the wait; the tries behind them age meanwhile, so the next
    one is not priced out)."""
    planned = simulate(shallow_drafter(), FIRST_ONLY, 4, 1100)
    assert min(planned) > 0  # the first draft pays every step
    explored = [i for i, n in enumerate(planned) if n > 4]
    assert explored[0] == EXPLORE_AFTER - 1
    gaps = [b - a for a, b in zip(explored, explored[1:])]
    assert len(gaps) >= 3 and gaps[0] == 2 * EXPLORE_AFTER and all(b == 2 * a for a, b in zip(gaps, gaps[1:]))


def test_exploration_leaves_requests_a_draft_model_is_far_behind_on():
    """A draft model's catch-up is paid for by the drafts after it; an exploration that
    finds drafting does not pay has none. Candidates whose backlog is over
    EXPLORE_BACKLOG per token they may still commit are not explored; the same
    controller explores ones with a backlog at or under it."""
    def explored(backlog: float) -> list[int]:
        return [i for i, n in enumerate(simulate(shallow_drafter(), FIRST_ONLY, 4, 300, backlog)) if n > 4]
    assert explored(0.0) == explored(EXPLORE_BACKLOG) != []
    assert explored(1.5 * EXPLORE_BACKLOG) == []


def test_requests_whose_first_draft_would_likely_miss_are_not_explored():
    """`ngram` at B = 16 after 1-token matches (first drafts accepted ~30% of the time)
    while 4-token matches put the continuation rates near 1: deep drafts after a first
    draft at the upper estimate (~0.4) look as if they might pay, but each explored row
    would add 8 verify tokens for ~0.3 positions tested past the first. No row at least
    EXPLORE_FIRST likely to hit: once its misses priced the first draft out, no step
    drafts (explorations of 4 x 8 came 32 steps later, as on open chat, where they cost
    1.5% of the run)."""
    ctl = DraftController(8, LatencyModel(0.0336, 0.0014))  # a draft pays at ~0.4 (16 rows)
    for i in range(30):
        ctl.observe(f"long{i}", 8, 8, source=4)
    for i in range(8):
        ctl.observe(f"short{i}", 1, int(i < 3), source=1)
    planned = simulate(ctl, [0.3] + [0.9] * 7, 16, 3 * EXPLORE_AFTER, context=0, source=1)
    assert planned[0] > 0 and ctl.accept.gains("r0", 1, EXPLORE_OPTIMISM, 1)[0] < EXPLORE_FIRST
    assert not any(planned[EXPLORE_AFTER // 2:])


def test_exploration_takes_the_requests_least_behind():
    """Of 8 candidates, the EXPLORE_ROWS with the smallest backlogs (a draft model's
    catch-up per future token) draft 8; the rest keep their plan."""
    ctl = shallow_drafter()
    ids = [f"r{i}" for i in range(8)]
    catchup = dict(zip(ids, [0.9, 0.1, 2.0, 0.0, 0.5, 0.3, 0.05, 0.7]))
    for _ in range(300):
        plan = ctl.choose(dict.fromkeys(ids, 8), 0, StepRows(catchup=catchup))
        if max(plan.values()) == 8:
            break
    assert {rid for rid, k in plan.items() if k == 8} == {"r3", "r6", "r1", "r5"}
    assert all(plan[rid] < 8 for rid in ("r0", "r2", "r4", "r7"))


def test_exploration_takes_the_requests_likeliest_to_accept_a_first_draft():
    """An exploration tests the continuation rates, which a first draft that misses leaves
    untested: of 8 candidates equally behind (none), the 4 whose first drafts hit draft 8,
    not the first 4 in candidate order, whose first drafts keep missing (`ngram` on open
    chat: 1-token guesses at ~12% listed before 4-token matches at ~69%)."""
    ctl = shallow_drafter()
    misses, hits = [f"miss{i}" for i in range(4)], [f"hit{i}" for i in range(4)]
    for _ in range(10):
        for rid in misses + hits:
            ctl.observe(rid, 1, int(rid in hits))
    for _ in range(300):
        plan = ctl.choose(dict.fromkeys(misses + hits, 8), 0)
        if max(plan.values()) == 8:
            break
        for rid, k in plan.items():
            ctl.observe(rid, k, min(k, 1) if rid in hits else 0)
    assert {rid for rid, k in plan.items() if k == 8} == set(hits)


def test_a_fresh_engine_whose_first_verification_missed_draft_2_explores_soon():
    """The prior (0.6) plans 2 drafts; a miss at draft 2 leaves one guess behind its rate,
    and the plan of one draft tests no continuation. The rate rests on under
    EXPLORE_EVIDENCE tries, so the exploration comes after EXPLORE_SOON steps (not
    EXPLORE_AFTER), and at 97% a draft batch 1 then drafts 8."""
    ctl = fresh_q8_self_draft()
    assert ctl.choose({"r0": 8}, 0) == {"r0": 2}
    ctl.observe("r0", 2, 1)
    planned = [2] + simulate(ctl, [1.0] + [0.97] * 7, 1, 40)  # the EXPLORE_SOON-th plan explores
    assert planned[1:EXPLORE_SOON - 1] == [1] * (EXPLORE_SOON - 2) and planned[EXPLORE_SOON - 1] == 8
    assert planned[-10:] == [8] * 10


def test_one_miss_at_a_deep_draft_leaves_its_rate_near_the_others():
    """A warm-up's runs (draft 7 tried twice, missed once) at batch 1: positions tried
    little take the pooled continuation rate as their prior, so one miss does not halve draft 7's
    rate, and at B = 16 the q8 self-draft still drafts. (With each position's prior the
    rate before it, draft 7 stood at 0.5 and B = 16 drafted nothing.)"""
    ctl = fresh_q8_self_draft()
    for k, accepted in [(2, 1)] + [(1, 1)] * 6 + [(2, 2), (3, 3), (4, 4), (5, 5), (6, 6), (8, 8), (8, 6)]:
        ctl.observe("warm-up", k, accepted)
    assert ctl.accept.hazard(7) > 0.7
    ids = [f"r{i}" for i in range(16)]
    assert sum(ctl.choose(dict.fromkeys(ids, 8), 0, StepRows(contexts=dict.fromkeys(ids, 300))).values()) > 0


def test_deferred_catch_ups_neither_reset_nor_join_an_exploration():
    """Candidates whose catch-up is deferred (rows about to join a batch that will not draft)
    have no drafts to test: a step of only such candidates leaves the exploration's idle
    count and doubled wait as they were, and they are never picked to explore."""
    ctl = q8_self_draft()
    ctl._idle, ctl._explore_after = 20, 4 * EXPLORE_AFTER
    ids = [f"r{i}" for i in range(16)]
    joining = {f"j{i}": (1000, 15.0, 8) for i in range(15)}
    plan = ctl.choose(dict.fromkeys(ids, 8), 0, StepRows(catchup=dict.fromkeys(ids, 15.0),
                                                         contexts=dict.fromkeys(ids, 1000), upcoming=joining))
    assert sum(plan.values()) == 0
    assert (ctl._idle, ctl._explore_after) == (20, 4 * EXPLORE_AFTER)


def layerskip_at_batch_1() -> DraftController:
    """A fresh `layerskip` controller as its start-up probes measured it (fp32, B = 1):
    a half-model draft pass costs 19 ms beside a 33 ms step, so at the 0.6 prior no k pays,
    but with every draft taken as accepted all 8 would."""
    ms = {1: 33.1, 2: 34.6, 6: 34.6, 7: 35.9, 9: 37.7}
    return DraftController(8, LatencyTable([(n, t / 1e3) for n, t in ms.items()]),
                           draft_latency=LatencyModel(0.01875, 0.00078))


def test_a_model_drafter_with_an_untested_first_draft_explores_shallow():
    """An exploration of a drafter whose first draft has never been tried drafts
    EXPLORE_GUESS_DEPTH, not all 8: each draft costs a pass, and the drafts past a first
    miss are never tried (`layerskip` accepted none, and explorations of 8 cost it 5% of a
    B = 1 run). Once first drafts hit, the plan drafts every step and explores all 8."""
    hopeless = simulate(layerskip_at_batch_1(), 0.0, 1, 300, context=0)
    assert any(hopeless) and max(hopeless) == EXPLORE_GUESS_DEPTH
    good = simulate(layerskip_at_batch_1(), 0.97, 1, 300, context=0)
    assert max(good[:EXPLORE_SOON + 1]) == EXPLORE_GUESS_DEPTH
    assert max(good) == 8 and sum(1 for n in good if n) > 280
