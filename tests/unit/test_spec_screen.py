"""`DraftController._plain_is_best`: a bound that skips pricing plans when none can beat the
plain step. It must never change a choice (every step's plan equals the full pricing's)
and must fire where drafts cannot pay (large batch, low acceptance)."""
from __future__ import annotations

import random

import pytest

from engine.spec import DraftController, LatencyModel
from engine.spec.controller import StepRows
from engine.spec.latency import LatencyTable
from tests.unit.test_spec_context import MEASURED, fp32_table


def _bumpy_table() -> LatencyTable:
    """One row's GEMV-to-GEMM jump and a flat stretch (a draft or two there are free),
    rows sampled at a temperature costing extra."""
    ms = {1: 36.0, 2: 44.0, 9: 44.0, 16: 52.0, 32: 80.0, 64: 120.0, 128: 230.0}
    return LatencyTable([(n, t / 1e3) for n, t in ms.items()], sample_cost=0.0003)


def _run(ctl: DraftController, seed: int, steps: int, tree: bool, counts: dict[str, int]) -> list[dict[str, int]]:
    """`steps` choices on one random workload: 1-64 rows, each a candidate for 1-8 drafts
    from a source whose drafts hit at 0.05-0.95 or 0.05-0.4 (chains) or with its own node gains
    (trees), some rows sampled at a temperature, random contexts; verifications drawn
    from the same per-step stream whatever was planned, so two controllers that choose
    alike see alike. `counts` tallies how often the screen and the full pricing ran."""
    rnd = random.Random(seed)
    top = 0.95 if seed % 2 else 0.4  # odd seeds: drafts often pay; even: rarely
    rates = {s: rnd.uniform(0.05, top) for s in (1, 2, 3, 4)}
    screen = ctl._plain_is_best

    def counted_screen(*args):
        hit = screen(*args)
        counts["screened" if hit else "priced"] += 1
        return hit
    ctl._plain_is_best = counted_screen
    out = []
    for step in range(steps):
        draw = random.Random(seed * 100003 + step)
        ids = [f"r{i}" for i in range(draw.choice([1, 2, 4, 16, 16, 64]))]
        cands = {rid: draw.randint(1, 8) for rid in ids if draw.random() < 0.8}
        sources = {rid: draw.choice([1, 1, 1, 2, 4]) for rid in cands}
        gains = {}
        if tree:
            for rid, n in cands.items():
                g, x = [], draw.random() ** 2
                for _ in range(n):
                    x *= draw.random() ** 0.3
                    g.append(x)
                gains[rid] = g
        rows = StepRows(gains=gains, stochastic=[rid for rid in ids if draw.random() < 0.2],
                        contexts={rid: draw.randint(20, 900) for rid in ids}, sources={} if tree else sources)
        chosen = ctl.choose(cands, len(ids) - len(cands), rows)
        out.append(chosen)
        for rid, k in chosen.items():
            accepted = 0
            while accepted < k and draw.random() < rates[sources[rid]]:
                accepted += 1
            ctl.observe(rid, k, accepted, None if tree else sources[rid])
        if draw.random() < 0.1:  # a request finishes
            ctl.forget(ids[0])
    ctl._plain_is_best = screen
    return out


@pytest.mark.parametrize("tree", [False, True])
@pytest.mark.parametrize("table", [fp32_table, _bumpy_table])
def test_the_screen_never_changes_a_choice(table, tree):
    """The same random workloads through a controller with the screen and one whose screen
    never fires: equal plans at every step (drafts, hysteresis and explorations alike), and
    the screen fired on a good share of the steps."""
    counts = {"screened": 0, "priced": 0}
    for seed in range(6):
        fast = DraftController(8, table(), context=MEASURED)
        full = DraftController(8, table(), context=MEASURED)
        full._plain_is_best = lambda *args: False
        assert _run(fast, seed, 150, tree, counts) == _run(full, seed, 150, tree, {"screened": 0, "priced": 0})
    assert counts["screened"] > 0.1 * (counts["screened"] + counts["priced"])
    assert counts["priced"] > 0.1 * (counts["screened"] + counts["priced"])


def test_no_plan_is_priced_at_a_large_batch_of_poor_guesses():
    """B = 16, every row a 1-token guess that hits 15% of the time (open chat with `ngram`):
    once the first steps have taught the rate, nearly every step without drafts is decided
    by the screen alone (`_plan` not called; as the idle rows' rates drift back up, a few
    are priced before they are tried again)."""
    ctl = DraftController(8, fp32_table(), context=MEASURED)
    planned, calls = [], []
    plan = ctl._plan
    ctl._plan = lambda *args: calls.append(1) or plan(*args)
    rnd, ids = random.Random(1), [f"r{i}" for i in range(16)]
    for step in range(100):
        calls.clear()
        chosen = ctl.choose(dict.fromkeys(ids, 8), 0, StepRows(contexts=dict.fromkeys(ids, 300),
                                                                sources=dict.fromkeys(ids, 1)))
        planned.append((sum(chosen.values()), len(calls)))
        for rid, k in chosen.items():
            ctl.observe(rid, k, int(k > 0 and rnd.random() < 0.15), 1)
    plain = [calls for drafts, calls in planned[20:] if not drafts]
    assert len(plain) >= 70 and sum(plain) <= 0.1 * len(plain)


def test_a_model_drafter_is_never_screened():
    """A draft model's catch-up terms can make a draft cost less than its verify token, so
    the bound does not hold for it: its plans are always priced, where the same rows with
    free drafts are decided by the screen."""
    priced = {}
    for label, drafter in (("free", None), ("model", LatencyModel(0.0081, 0.00064))):
        ctl = DraftController(8, fp32_table(), draft_latency=drafter, context=MEASURED)
        for _ in range(30):
            ctl.observe("warm-up", 8, 0)  # first drafts that miss: nothing pays
        calls = []
        plan = ctl._plan
        ctl._plan = lambda *args, plan=plan, calls=calls: calls.append(1) or plan(*args)
        rows = StepRows(contexts={"a": 100, "b": 100})
        for _ in range(5):
            assert not any(ctl.choose(dict.fromkeys(["a", "b"], 8), 14, rows).values())
        priced[label] = len(calls)
    assert priced == {"free": 0, "model": 5}
