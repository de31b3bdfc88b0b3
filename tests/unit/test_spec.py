"""Speculative decoding parts without a model: ngram drafter, verification, controller,
and the statistical exactness of verifying drafts with the real sampler."""
from __future__ import annotations

import random

import pytest
import torch

from engine.sample import Sampler, SamplingRow, build_sampling_metadata
from engine.sampling_params import SamplingParams
from engine.spec import DraftController, LatencyModel, accept_drafts, create_drafter
from engine.spec.controller import DRAFT_MARGIN, StepRows
from engine.spec.latency import LatencyTable, fit_quality
from engine.spec.base import Drafter, Proposal
from engine.spec.ngram import NgramDrafter


def chisquare_pvalue(observed: torch.Tensor, expected: torch.Tensor) -> float:
    """Pearson's chi-square goodness of fit; p = P(chi2_{k-1} >= statistic)."""
    stat = ((observed.double() - expected.double()) ** 2 / expected.double()).sum()
    dof = torch.tensor(float(observed.numel() - 1), dtype=torch.float64)
    return float(torch.special.gammaincc(dof / 2, stat / 2))


# ----------------------------------------------------------------- ngram drafter


def reference_ngram(tokens: list[int], k: int, max_n: int = 4) -> list[int]:
    """Brute force: longest suffix (n = max_n..1) with an earlier occurrence, most recent one."""
    length = len(tokens)
    for n in range(min(max_n, length - 1), 0, -1):
        suffix = tokens[length - n:]
        for end in range(length - 1, n - 1, -1):  # occurrence tokens[end - n:end], end < length
            if tokens[end - n:end] == suffix:
                return tokens[end:end + k]
    return []


def test_ngram_incremental_index_matches_brute_force():
    rng = random.Random(0)
    drafter = NgramDrafter()
    for trial in range(20):
        tokens = [rng.randrange(6) for _ in range(rng.randint(1, 5))]
        for _ in range(60):  # grow one or a few tokens at a time, as requests do
            k = rng.randint(1, 8)
            assert drafter.propose(f"r{trial}", tokens, k) == reference_ngram(tokens, k)
            tokens += [rng.randrange(6) for _ in range(rng.randint(1, 3))]
        drafter.forget(f"r{trial}")
    assert drafter._state == {}


def test_ngram_prefers_longest_match_and_recent_occurrence():
    d = create_drafter("ngram")
    #        0  1  2  3  4  5  6  7  8  9
    toks = [1, 2, 3, 9, 5, 2, 3, 7, 1, 2, 3]
    assert d.propose("a", toks, 3) == [9, 5, 2]  # "1 2 3" (n=3) beats the later "2 3"
    assert d.propose("b", [4, 5, 6], 3) == []  # no earlier occurrence of any suffix
    assert d.propose("c", [7, 7, 7, 7], 2) == [7]  # capped at the end of the tokens
    with pytest.raises(ValueError, match="unknown speculative method"):
        create_drafter("nope")


def test_ngram_names_its_match_length_as_the_proposal_source():
    d = create_drafter("ngram")
    toks = [1, 2, 3, 9, 5, 2, 3, 7, 1, 2, 3]
    assert d.propose_tree("a", toks, 3) == Proposal([9, 5, 2], source=3)
    assert d.propose_tree("b", [8, 1, 2, 3, 4, 6, 1, 2, 3, 4], 2) == Proposal([6, 1], source=4)
    assert d.propose_tree("c", [5, 6, 7, 5], 2) == Proposal([6, 7], source=1)
    assert d.propose_tree("d", [4, 5, 6], 3) == Proposal([])


# ----------------------------------------------------------------- verification


def test_accept_drafts_longest_matching_prefix_plus_one():
    assert accept_drafts([5, 6, 7], [5, 6, 7, 8]) == [5, 6, 7, 8]  # all accepted + bonus
    assert accept_drafts([5, 6, 7], [5, 9, 7, 8]) == [5, 9]  # correction at the first miss
    assert accept_drafts([5, 6, 7], [4, 6, 7, 8]) == [4]
    assert accept_drafts([], [3]) == [3]


def _first_token_counts(logits: torch.Tensor, draft: int, params: SamplingParams, n: int,
                        residual_is_p: bool = False) -> torch.Tensor:
    """n verifications of a one-token draft with the real sampler; counts of the committed
    first token. `residual_is_p` is the deliberate bug: on rejection draw again from p."""
    rows = [SamplingRow(params, [], [])] * n
    meta = build_sampling_metadata(rows, logits.shape[-1], "cpu")
    target = Sampler()(logits.expand(n, -1).clone(), meta).sampled_token_ids.tolist()
    fresh = Sampler()(logits.expand(n, -1).clone(), meta).sampled_token_ids.tolist()
    first = []
    for x, y in zip(target, fresh):
        kept = accept_drafts([draft], [x, 0])[0]
        first.append(y if residual_is_p and kept != draft else kept)
    return torch.bincount(torch.tensor(first), minlength=logits.shape[-1])


def _target_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    x = logits[0] / params.temperature
    if params.top_k:
        x = x.masked_fill(x < x.topk(params.top_k).values[-1], float("-inf"))
    probs = x.softmax(-1)
    if params.top_p < 1.0:
        sorted_p, idx = probs.sort(descending=True)
        keep = (sorted_p.cumsum(0) - sorted_p) < params.top_p
        probs = torch.zeros_like(probs).scatter_(0, idx[keep], sorted_p[keep])
        probs /= probs.sum()
    return probs


@pytest.mark.parametrize("params", [SamplingParams(temperature=1.0),
                                    SamplingParams(temperature=0.7, top_k=5),
                                    SamplingParams(temperature=1.3, top_p=0.8)])
def test_verification_is_exact_and_the_wrong_residual_is_caught(params):
    torch.manual_seed(123)
    vocab, n = 12, 40_000
    logits = torch.randn(1, vocab) * 1.5
    probs = _target_probs(logits, params)
    draft = int(probs.argmax())  # the draft most often accepted: the wrong residual shows most
    support = probs > 0
    expected = probs[support] * n
    ok = _first_token_counts(logits, draft, params, n)
    assert chisquare_pvalue(ok[support], expected) > 1e-3
    assert ok[~support].sum() == 0
    bad = _first_token_counts(logits, draft, params, n, residual_is_p=True)
    assert chisquare_pvalue(bad[support], expected) < 1e-6


# ----------------------------------------------------------------- controller


def cpu_like() -> LatencyModel:
    """Synthetic: 50 ms per step plus 3 ms per token (memory-bound at small N)."""
    return LatencyModel(0.050, 0.003)


def test_latency_model_fit_and_online_refinement():
    samples = [(n, 0.02 + 0.001 * n) for n in (1, 4, 16, 64)]
    model = LatencyModel.fit(samples)
    assert model.fixed == pytest.approx(0.02, rel=1e-6) and model.per_token == pytest.approx(0.001)
    assert fit_quality(model, samples) < 1e-6
    for _ in range(300):  # the machine got twice as slow per token
        for n in (2, 30):
            model.observe(n, 0.02 + 0.002 * n)
    assert model.per_token == pytest.approx(0.002, rel=0.05)


def test_online_samples_at_a_few_n_do_not_unfix_the_probed_slope():
    """A draft pass probed at 1..48 rows (5.5 ms + 0.8 ms per row), then run online at
    B = 4 only (3-4 rows, a few ms of noise): decayed samples alone would fit their own
    slope (here negative, clamped to 0: every extra row free); the probes stay in."""
    line = LatencyModel.fit([(n, 0.0055 + 0.0008 * n) for n in (1, 4, 16, 48)])
    for i in range(300):
        n = 3 + i % 2
        line.observe(n, 0.0055 + 0.0008 * n + (0.0015 if n == 3 else -0.0005))
    assert 0.0006 < line.per_token < 0.001
    assert line.predict(4) == pytest.approx(0.0055 + 0.0032, abs=0.001)


def test_controller_speculates_at_batch_1_with_high_acceptance():
    ctl = DraftController(8, cpu_like())
    for _ in range(20):
        ctl.observe("a", 8, 8)  # everything accepted
    assert ctl.choose({"a": 8}, other_tokens=0) == {"a": 8}


def test_controller_no_drafts_at_low_acceptance_or_large_batch():
    ctl = DraftController(8, cpu_like())
    for _ in range(100):
        ctl.observe("a", 4, 0)
    assert ctl.choose({"a": 8}, other_tokens=0) == {"a": 0}
    compute_bound = DraftController(8, LatencyModel(0.005, 0.004))
    plan = compute_bound.choose({f"r{i}": 8 for i in range(64)}, other_tokens=0)
    assert set(plan.values()) == {0}  # at prior acceptance a draft costs more than it brings


def test_fixed_k_when_not_adaptive():
    ctl = DraftController(4, cpu_like(), adaptive=False)
    assert ctl.choose({"a": 8, "b": 2}, other_tokens=100) == {"a": 4, "b": 2}


def _accepted_run(rng: random.Random, k: int, first: float, then: float) -> int:
    """Accepted drafts of k: the first with probability `first`, each next one `then`."""
    accepted = 0
    while accepted < k and rng.random() < (first if accepted == 0 else then):
        accepted += 1
    return accepted


def _stationary_changes(seed: int, warm_up: int, steps: int) -> tuple[int, dict[str, int]]:
    """Plan changes over `steps` steps after `warm_up` steps of two requests drafting at a
    stationary 0.7 per position; and the last plan."""
    rng = random.Random(seed)
    ctl = DraftController(8, cpu_like())
    changes, last = 0, None
    for step in range(warm_up + steps):
        plan = ctl.choose({"a": 8, "b": 8}, other_tokens=0)
        for rid, k in plan.items():
            ctl.observe(rid, k, _accepted_run(rng, k, 0.7, 0.7))
        changes += step >= warm_up and plan != last  # 100 pairs: the first with the warm-up's last plan
        last = plan
    return changes, last


def test_controller_k_is_stable_on_a_stationary_input():
    # Counted once the estimates have left the prior (0.6) for the input's rates: from
    # step 0, the learning itself changes k 5-17 times in 100 steps (seeds 0-9).
    for seed in range(10):
        changes, last = _stationary_changes(seed, warm_up=20, steps=100)
        assert changes <= 10, seed
        assert all(k > 0 for k in last.values())


def test_a_held_plan_priced_under_no_drafts_gives_way_to_no_drafts():
    """Hysteresis holds last step's plan against a new one of as many drafts unless the new
    one beats it by the margin, but not an old plan priced under the plain step: here a's
    draft (its rate fell to ~0.47) prices under no drafts and b's (~0.61) just over them,
    within the margins, so the step runs plain. Holding a's plan kept drafts that cost more
    than they commit (`ngram`, open chat B = 16). (a's plan is made at 6 rows, where its
    draft clears DRAFT_MARGIN.)"""
    ctl = DraftController(8, cpu_like())
    for _ in range(20):
        ctl.observe("a", 1, 1)
    assert ctl.choose({"a": 1}, 5) == {"a": 1}  # the plan hysteresis holds to
    for i in range(11):
        ctl.observe("a", 1, 0)
        ctl.observe("b", 1, int(i % 5 < 3))
    t16, t17 = ctl.latency.predict(16), ctl.latency.predict(17)
    plain, with_a, with_b = (16 / t16, (16 + ctl.acceptance("a")) / t17, (16 + ctl.acceptance("b")) / t17)
    assert with_a < plain < with_b < (1 + ctl.switch_margin) * plain
    assert ctl.choose({"a": 1, "b": 1}, 14) == {"a": 0, "b": 0}


@pytest.mark.parametrize("drafter", [None, LatencyModel(0.0, 0.0)])
def test_a_plan_with_drafts_must_beat_the_plain_step_by_the_draft_margin(drafter):
    """A draft accepted ~95% of the time, at 16 rows of cpu_like: worth ~2.8% over the plain
    step (over `switch_margin`, under DRAFT_MARGIN), so it is not taken; at 6 rows (~11%) it
    is. Near break-even the choice rests on start-up probes that move by a few percent: the
    q8 self-draft at B = 16 read 0.969-1.056x of no speculation round to round (lockstep) at
    no margin, 0.984-1.081x at 5%. Free drafts are screened by `_plain_is_best`; a model
    drafter's (free passes here) reach `_greedy`."""
    ctl = DraftController(8, cpu_like(), draft_latency=drafter)
    for _ in range(20):
        ctl.observe("a", 1, 1)
    t16, t17, t6, t7 = (ctl.latency.predict(n) for n in (16, 17, 6, 7))
    a = ctl.acceptance("a")
    assert 1 + ctl.switch_margin < (16 + a) / t17 / (16 / t16) < 1 + DRAFT_MARGIN
    assert ctl.choose({"a": 1}, 15) == {"a": 0}
    assert (6 + a) / t7 / (6 / t6) > 1 + DRAFT_MARGIN
    assert ctl.choose({"a": 1}, 5) == {"a": 1}


def test_a_request_that_keeps_missing_stops_being_drafted_after_a_workload_change():
    # A server served grounded requests (70% first drafts, then 85% a draft), then open
    # chat whose drafts all miss: the drafter-wide rate stays high for ~50 verifications,
    # so only the request's own misses can stop its drafts (at B = 1 a draft pays above
    # ~6%). With 4 pseudo-tries at that rate against 5 remembered tries, the first open
    # chat request drafted 276-447 tokens over 64 steps (seeds 0-4).
    for seed in range(5):
        rng = random.Random(seed)
        ctl = DraftController(8, cpu_like())
        for r in range(4):
            for _ in range(30):
                k = ctl.choose({f"g{r}": 8}, 0)[f"g{r}"]
                ctl.observe(f"g{r}", k, _accepted_run(rng, k, 0.7, 0.85))
            ctl.forget(f"g{r}")
        assert ctl.acceptance("new") > 0.5  # the drafter-wide rate a new request starts from
        drafted = []
        for _ in range(64):
            drafted.append(ctl.choose({"o": 8}, 0)["o"])
            ctl.observe("o", drafted[-1], 0)
        assert drafted[0] > 0  # it starts from the high drafter-wide rate, and drafts
        assert sum(drafted) <= 120, seed


def _drafted_by_source(seed: int, keyed: bool) -> dict[int, list[int]]:
    """8 requests each step, each proposing after a 4-token match (25%: first draft accepted
    70%, then 80%) or a 1-token one (12%, then 50%), as `ngram` on open chat; with `keyed`
    the controller is told each proposal's source. Returns source -> drafts planned for each
    such proposal over the 100 steps after a 50-step warm-up."""
    rng = random.Random(seed)
    ctl = DraftController(8, cpu_like())
    rates = {4: (0.7, 0.8), 1: (0.12, 0.5)}
    out: dict[int, list[int]] = {4: [], 1: []}
    for step in range(150):
        sources = {f"r{i}": 4 if rng.random() < 0.25 else 1 for i in range(8)}
        plan = ctl.choose(dict.fromkeys(sources, 8), 0, StepRows(sources=sources if keyed else {}))
        for rid, k in plan.items():
            src = sources[rid]
            ctl.observe(rid, k, _accepted_run(rng, k, *rates[src]), src if keyed else None)
            if step >= 50:
                out[src].append(k)
    return out


def test_controller_prices_first_drafts_by_their_source():
    # At 8 rows of cpu_like a first draft alone pays above ~0.74 (DRAFT_MARGIN), a 0.7
    # one followed by drafts at 0.8 does. Pooled, the first drafts are
    # accepted ~27% of the time and none pays; by source, the 4-token matches (70%) do,
    # but for a request whose own rate for them a recent miss halved (one pseudo-try), and
    # in the plain step every PLAIN_CHECK_AFTER + 1 steps while drafts pay little (1 in 9).
    for seed in range(3):
        keyed = _drafted_by_source(seed, keyed=True)
        assert sum(k > 0 for k in keyed[4]) >= 0.6 * len(keyed[4]), seed
        assert sum(k > 0 for k in keyed[1]) <= 0.05 * len(keyed[1]), seed
        pooled = _drafted_by_source(seed, keyed=False)
        assert sum(k > 0 for k in pooled[4]) <= 0.1 * len(pooled[4]), seed  # what keying fixes


def test_an_untried_source_is_explored_at_its_upper_estimate():
    """A source no verification has tried rests on no tries: its upper estimate is 1, so
    `_deeper_may_pay` may explore it, however many tries the other sources had."""
    from engine.spec.acceptance import AcceptanceModel
    model = AcceptanceModel(8)
    for i in range(40):
        model.observe(f"r{i}", 1, 0, source=1)
    assert model.gains("new", 1, 2.0, source=4) == [1.0]
    assert model.gains("new", 1, 2.0, source=1)[0] < 0.3


def test_decoder_learns_each_verification_under_its_proposals_source():
    from engine.request import Request
    from engine.sched.output import ScheduledRequest
    from engine.spec.decoder import SpeculativeDecoder
    ctl = DraftController(8, cpu_like(), adaptive=False)  # both draft every step
    decoder = SpeculativeDecoder(create_drafter("ngram"), ctl)
    long_match = Request("long", [8, 1, 2, 3, 4, 6, 7, 1, 2, 3, 4], SamplingParams(max_tokens=32))
    short_match = Request("short", [5, 6, 7, 9, 9, 5], SamplingParams(max_tokens=32))
    for req in (long_match, short_match):
        req.num_computed_tokens = req.num_tokens - 1
    for _ in range(3):
        decoder.propose([long_match, short_match])
        assert long_match.draft_token_ids[:2] == [6, 7] and short_match.draft_token_ids[:1] == [6]
        scheduled = [ScheduledRequest(r, r.num_computed_tokens, 1 + len(r.draft_token_ids), (), True,
                                      tuple(r.draft_token_ids)) for r in (long_match, short_match)]
        decoder.observe(scheduled, {"long": 3, "short": 1}, 0, 0.0)  # 2 drafts accepted / none
    # 3 hits and 3 misses at 4 pseudo-tries at 0.6: 0.77 after 4-token matches, 0.34 after 1.
    # The drafter-wide rate took all six: 0.54.
    assert ctl.accept.shared_first(4) > 0.75 and ctl.accept.shared_first(1) < 0.35
    assert 0.5 < ctl.accept.shared_first() < 0.6
    assert ctl.acceptance("long") < ctl.accept.first("long", 4)  # a request's rate is by source too


def test_controller_counts_model_draft_passes():
    cheap = DraftController(8, cpu_like(), draft_latency=LatencyModel(0.001, 0.0001))
    for _ in range(20):
        cheap.observe("a", 8, 8)
    assert cheap.choose({"a": 8}, other_tokens=0)["a"] > 0
    # A draft pass costing as much as a target step: (1 + k) tokens for T(1 + k) + k T(1) never pays.
    step = cpu_like()
    costly = DraftController(8, step, draft_latency=LatencyModel(step.fixed, step.per_token))
    for _ in range(20):
        costly.observe("a", 8, 8)
    assert costly.choose({"a": 8}, other_tokens=0) == {"a": 0}
    # A pass's fixed cost is shared by its rows: one draft alone does not pay for it, eight do.
    shared = DraftController(4, cpu_like(), draft_latency=LatencyModel(0.02, 0.0005))
    for r in range(8):
        for _ in range(20):
            shared.observe(f"r{r}", 4, 3)
    batch = shared.choose({f"r{r}": 4 for r in range(8)}, other_tokens=0)
    assert all(k > 0 for k in batch.values()), batch


def test_new_requests_start_from_the_drafters_observed_acceptance():
    ctl = DraftController(8, cpu_like())
    assert ctl.acceptance("new") == ctl.prior
    for i in range(60):  # a workload the drafter does not suit: nothing accepted
        ctl.observe(f"old{i % 6}", 4, 0)
    assert ctl.acceptance("new") < 0.1
    assert ctl.choose({"new": 8}, other_tokens=0) == {"new": 0}  # a fresh request is not drafted blindly


def test_controller_sizes_trees_from_the_drafters_node_gains():
    """A tree drafter's per-node acceptance replaces a_r^j: the tree is cut where a node's
    gain no longer pays for its verify token, and large batches get no tree."""
    lat = LatencyModel(0.03, 0.001)  # a node costs 1 ms against a 31 ms step
    gains = [0.5, 0.2, 0.1, 0.04, 0.02, 0.01, 0.005, 0.001]
    ctl = DraftController(8, lat)
    for _ in range(50):
        ctl.observe("a", 1, 0)  # a_r ~ 0 would give no drafts without the tree's own gains
    k = ctl.choose({"a": 8}, other_tokens=0, rows=StepRows(gains={"a": gains}))["a"]
    # With k nodes goodput is (1 + sum(gains[:k])) / (31 + k) ms; the best k is 3.
    best = max(range(9), key=lambda n: (1 + sum(gains[:n])) / (0.031 + 0.001 * n))
    assert k == best == 3
    big = DraftController(8, LatencyModel(0.005, 0.004))
    plan = big.choose({f"r{i}": 8 for i in range(64)}, 0, StepRows({f"r{i}": gains for i in range(64)}))
    assert set(plan.values()) == {0}


def test_latency_table_interpolates_extrapolates_and_stays_monotone():
    table = LatencyTable([(1, 0.005), (2, 0.008), (9, 0.015), (4, 0.010)])
    assert table.knots == [1, 2, 4, 9]
    assert table.predict(1, 1) == pytest.approx(0.005) and table.predict(0) == pytest.approx(0.005)
    assert table.predict(3, 3) == pytest.approx(0.009)  # halfway between the knots at 2 and 4
    assert table.predict(19, 19) == pytest.approx(0.015 + 10 * 0.005 / 5)  # last segment's slope
    bumpy = LatencyTable([(1, 0.010), (2, 0.008), (3, 0.012)])  # a noisy probe below its left knot
    assert bumpy.times == [0.010, 0.010, 0.012]


def test_greedy_plan_is_the_best_prefix_of_the_drafts_by_gain():
    """`_greedy` (vectorized) against the goodput of every prefix of the drafts in gain order,
    each priced on its own by `_goodput`: with free drafts and with a model drafter's passes,
    catch-ups, contexts and sampled rows."""
    from engine.spec.controller import Pricing
    from engine.spec.latency import ContextCost
    rng = random.Random(3)
    table = LatencyTable([(1, 0.045), (2, 0.05), (9, 0.07), (32, 0.11), (128, 0.29)], sample_cost=0.0003)
    for trial in range(40):
        drafter = LatencyModel(0.01, 0.002) if trial % 2 else None
        ctl = DraftController(8, table, draft_latency=drafter, catchup_per_token=0.0005 if drafter else None,
                              context=ContextCost(3e-6, 7e-7, 1e-6))
        ids = [f"r{i}" for i in range(rng.choice([1, 3, 16]))]
        gains = {}
        for rid in ids:
            g, x = [], rng.random()
            for _ in range(8):
                x *= rng.choice([1.0, rng.random() ** 0.2])
                g.append(x)
            gains[rid] = g
        cands = {rid: rng.randint(1, 8) for rid in ids}
        p = Pricing(gains, frozenset(), 2, {rid: rng.choice([0.0, 0.3]) for rid in ids} if drafter else {},
                    frozenset(ids[::3]), {rid: rng.randint(10, 600) for rid in ids}, 0.001, frozenset(), {})
        base = p.others + len(ids)
        order = sorted(((gains[rid][j - 1], rid) for rid in ids for j in range(1, cands[rid] + 1)), reverse=True)
        prefixes, plan = [dict.fromkeys(ids, 0)], dict.fromkeys(ids, 0)
        for _, rid in order:
            plan = {**plan, rid: plan[rid] + 1}
            prefixes.append(plan)
        plain = ctl._goodput(p, prefixes[0], base)
        best = max(ctl._goodput(p, q, base) for q in prefixes)
        best = best if best > (1 + DRAFT_MARGIN) * plain else plain  # drafts only past the margin
        assert ctl._goodput(p, ctl._greedy(p, cands, base), base) == pytest.approx(best, rel=1e-9)


def test_latency_predict_many_equals_predict_at_every_step_size():
    """The controller prices a step's every draft prefix at once (`predict_many`): below the
    first knot, on and between knots, past the last one, with rows sampled at a temperature,
    after online learning moved the scale, and for a one-knot table and a straight line."""
    import numpy as np
    table = LatencyTable([(2, 0.008), (4, 0.010), (9, 0.015), (30, 0.020)], sample_cost=0.0003)
    table.observe(9, 0.02, 9)
    tokens, sto = np.arange(0, 60), np.arange(60) % 7
    for model in (table, LatencyTable([(5, 0.01)], sample_cost=0.001), LatencyModel(0.004, 0.001)):
        many = model.predict_many(tokens, sto)
        assert many == pytest.approx([model.predict(int(n), int(n), int(s)) for n, s in zip(tokens, sto)], rel=1e-12)


def test_latency_table_carries_a_drift_to_every_knot_and_learns_shape_near_n():
    table = LatencyTable([(1, 0.005), (2, 0.008), (9, 0.015), (64, 0.050)])
    probe = {n: table.predict(n) for n in (1, 2, 5, 9, 64)}
    for _ in range(100):
        table.observe(5, 2 * probe[5], 5)  # the whole machine runs 2x slower than probed
    assert table.predict(5) == pytest.approx(2 * probe[5], rel=0.02)
    # The knots the workload did not visit follow (one learnt alone, a far knot kept its
    # probe and a plan priced from both mixed two speeds of the machine). Not wholly: the
    # visited knots took their share (3% against the scale's 10% a step) before the
    # prediction matched, and keep it, so the rest follow ~92% of a 2x drift.
    for n in (1, 64):
        assert 1.8 * probe[n] < table.predict(n) < 2 * probe[n]
    before = (list(table.times), table.scale)
    table.observe(40, 1.0, 4)  # 36 prefill tokens: not the table's shape
    assert (table.times, table.scale) == before
    # Two visited N slower by different factors: the shape learns the difference.
    for _ in range(1500):
        table.observe(2, 2 * probe[2], 2)
        table.observe(9, 3 * probe[9], 9)
    assert table.predict(2) == pytest.approx(2 * probe[2], rel=0.05)
    assert table.predict(9) == pytest.approx(3 * probe[9], rel=0.05)
    for _ in range(100):
        table.observe(128, 0.4, 128)  # past the last knot: the scale learns it
    assert table.predict(128) == pytest.approx(0.4, rel=0.02)
    table.observe(64, 100.0, 64)  # an interrupted step moves the scale by a bounded amount
    assert table.predict(128) < 0.4 * 1.15  # 100 s counted as 2x: the scale +10%, the knot a little


def test_a_drift_seen_at_the_plain_step_does_not_start_drafts_the_probes_priced_out():
    """B = 64 on a table of T(64) = 150 ms and T(128) = 250 ms: a draft costs 1.56 ms against
    2.34 ms per committed token, so first drafts accepted at 0.6 do not pay. The machine then
    runs every step 30% slower; the engine sees only plain steps (no drafts). With the plain
    knot learnt alone, T(64) rose to 195 ms under a 250 ms T(128) and drafts looked cheap
    (0.86 ms against 3.05): the plan turned to drafting on a slowdown of the machine."""
    table = LatencyTable([(1, 0.050), (64, 0.150), (128, 0.250)])
    ctl = DraftController(8, table)
    ids = [f"r{i}" for i in range(64)]
    gains = dict.fromkeys(ids, [0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05, 0.02])
    assert sum(ctl.choose(dict.fromkeys(ids, 8), 0, StepRows(gains)).values()) == 0
    for _ in range(200):
        table.observe(64, 1.3 * 0.150, 64)
        plan = ctl.choose(dict.fromkeys(ids, 8), 0, StepRows(gains))
        assert sum(plan.values()) == 0
    assert table.predict(64) == pytest.approx(1.3 * 0.150, rel=0.02)


def test_step_latency_probes_every_draft_length_at_batch_1_and_prices_the_gemv_jump(monkeypatch):
    """One row runs as a GEMV (cheap), two or more as GEMM tiles: the table measures one
    row at each 1 + k, stops at the first probe without KV room, and a 20%-acceptance
    draft at batch 1 does not pay for the jump. A line through the larger steps would
    make that draft look nearly free."""
    from engine.spec.decoder import measure_step_latency, probe_shapes

    def cost(n):
        return 0.004 if n == 1 else 0.006 + 0.0005 * n

    ran, clock = [], [0.0]

    def probe(rows, per_row, temperature):
        if rows * per_row > 64:
            return False  # "no KV room"
        ran.append((rows, per_row))
        clock[0] += cost(rows * per_row) + (0.0002 * rows * per_row if temperature > 0 else 0.0)
        return True

    import engine.spec.decoder as decoder
    monkeypatch.setattr(decoder.time, "perf_counter", lambda: clock[0])  # probes take model time
    shapes = probe_shapes(8, 200, 22)
    assert [s for s in shapes if s[0] == 1] == [(1, n) for n in range(1, 10)] and shapes[-1] == (22, 9)
    table = measure_step_latency(probe, shapes)
    assert all(rows * per_row <= 64 for rows, per_row in ran) and max(table.knots) <= 64 < table.knots[-1] + 32
    for n in (1, 2, 5, 9):
        assert table.predict(n, n) == pytest.approx(cost(n), rel=1e-9)  # knots are greedy steps
    # Sampling at a temperature costs 0.2 ms per row more, measured on the largest probe.
    assert table.sample_cost == pytest.approx(0.0002, rel=1e-6)
    assert table.predict(9, 9, 9) == pytest.approx(cost(9) + 9 * 0.0002, rel=1e-9)

    def plan(latency):
        ctl = DraftController(4, latency, prior=0.2)
        return ctl.choose({"a": 4}, other_tokens=0)

    assert plan(table) == {"a": 0}
    assert plan(LatencyModel(0.006, 0.0005)) != {"a": 0}  # the line through N >= 2 drafts


def test_plain_decodes_in_the_step_count_as_committed_tokens():
    """7 drafting candidates beside 9 plain decodes: the step commits 16 tokens without
    drafts, so a 0.6-acceptance draft (3.3 ms for 0.6 tokens) does not pay against a 78 ms
    step of 16 tokens, although it would against the candidates' 7 tokens alone."""
    lat = LatencyModel(0.025, 0.00332)
    ctl = DraftController(8, lat)
    assert set(ctl.choose({f"r{i}": 8 for i in range(7)}, 9).values()) == {0}
    alone = DraftController(8, lat).choose({f"r{i}": 8 for i in range(7)}, 0)
    assert any(alone.values())  # 7 tokens / 48 ms: the same drafts pay



def test_a_request_that_keeps_missing_stops_being_drafted_within_a_few_verifications():
    """Batch 1, drafts cheap (50 ms + 3 ms per token, so a 6% acceptance would pay): from
    the 0.6 prior a request whose drafts all miss wastes at most 40 draft tokens in 30 steps
    and under 60 in 100 (re-tries included); the per-try EMA with a symmetric switch margin
    wasted 78 in 30 and went on drafting 2 a step."""
    ctl = DraftController(8, cpu_like())
    plans = []
    for _ in range(100):
        plans.append(ctl.choose({"a": 8}, other_tokens=0)["a"])
        ctl.observe("a", plans[-1], 0)
    assert plans[0] > 0 and sum(plans[:30]) <= 40 and sum(plans) < 60
    assert sum(k > 0 for k in plans[30:]) <= 20


def test_a_request_written_off_early_is_tried_again():
    """Native-like batch 1 (T(1) = 8 ms, T(2) = 11.7 ms): two unlucky misses stop drafting;
    with no evidence the request's estimate drifts back and it is drafted again, and the
    long runs it then shows keep it drafted. Without the idle drift it stayed at k = 0."""
    table = LatencyTable([(1, 0.0082), (2, 0.0117), (5, 0.0135), (9, 0.0168), (16, 0.025)])
    ctl = DraftController(8, table)
    plans = []
    for step in range(80):
        plans.append(ctl.choose({"a": 8}, other_tokens=0)["a"])
        ctl.observe("a", plans[-1], 0 if step < 2 else plans[-1])  # then every draft accepted
    assert plans[0] > 0 and 0 in plans[:10]
    assert all(k > 0 for k in plans[-20:])


def test_drafts_past_the_current_k_inherit_the_continuation_rate_seen_so_far():
    """A request at k = 4 whose runs are always fully accepted: positions 5-8 were never
    tried, so they start from position 4's rate, not the 0.6 prior, and k grows to 8."""
    table = LatencyTable([(1, 0.0082), (2, 0.0117), (5, 0.0135), (9, 0.0168), (16, 0.025)])
    ctl = DraftController(8, table)
    ks = []
    for _ in range(40):
        ks.append(ctl.choose({"a": 4}, other_tokens=0)["a"])
        ctl.observe("a", ks[-1], ks[-1])
    assert ks[-1] == 4  # it could only draft 4 so far
    assert ctl.accept.hazard(8) > 0.9
    assert ctl.choose({"a": 8}, other_tokens=0)["a"] == 8


def test_long_runs_raise_the_gain_of_later_drafts_above_a_per_position_rate():
    """All-or-nothing runs (an n-gram copy is right for 8 tokens or wrong at once) at 50%:
    P(all 8 accepted) is ~0.5, not 0.5^8; the continuation rates learn that."""
    from engine.spec.acceptance import AcceptanceModel

    model = AcceptanceModel(8)
    for i in range(200):
        model.observe(f"r{i % 10}", 8, 8 if i % 2 else 0)
    gains = model.gains("new", 8)
    assert gains == sorted(gains, reverse=True) and len(gains) == 8
    assert gains[0] == pytest.approx(0.5, abs=0.1)
    assert gains[7] > 0.8 * gains[0] and gains[7] > 20 * gains[0] ** 8
    geometric = AcceptanceModel(8)
    for i in range(200):  # every position accepted with probability 0.5 independently
        geometric.observe("r", 8, [0, 1, 0, 2, 0, 1, 3, 0][i % 8])
    assert geometric.gains("r", 3)[2] < 0.25


def test_a_close_drafts_gains_are_not_held_down_by_the_prior():
    """The q8 self-draft at open chat B = 1 (31 verifications of 8 drafts over 4 requests,
    96-100% of drafts accepted at each position, 7.1 of 8 per verification): 4 pseudo-tries
    at 0.6 on each continuation rate predicted 5.8 accepted drafts of 8, and adaptive drafted
    6 a step where 8 ran 7% faster. The continuation rates now start from the rate of the
    position before (the first draft's: drafter-wide) with one pseudo-try."""
    from engine.spec.acceptance import AcceptanceModel

    model = AcceptanceModel(8)
    runs = [8] * 8 + [5]  # every ninth verification misses at draft 6
    accepted = [runs[i % len(runs)] for i in range(31)]
    for i, a in enumerate(accepted):
        model.observe(f"r{i // 8}", 8, a)
    actual = sum(accepted) / len(accepted)
    assert sum(model.gains("r3", 8)) > 0.95 * actual  # 0.97 (before: 0.915)


# ------------------------------------------------- a draft model's catch-up cost


def measured_fp32_table() -> LatencyTable:
    """T(N) of the fp32 path as this machine's start-up probes measured it (ms -> s)."""
    ms = {1: 36.4, 9: 46.6, 12: 49.9, 20: 58.4, 30: 68.3, 44: 90.6, 68: 117.8, 102: 149.8, 144: 198.9}
    return LatencyTable([(n, t / 1e3) for n, t in ms.items()])


class _AlwaysDrafts(Drafter):
    """Proposes k drafts for every request; `backlog` tokens of catch-up each."""
    keeps_kv = True

    def __init__(self, backlog: int):
        self._backlog = backlog

    def propose(self, request_id, token_ids, k):
        return [7] * k

    def backlog(self, request_id, num_computed_tokens):
        return self._backlog


def _decoding(n: int, prompt: int = 285, max_tokens: int = 64):
    from engine.request import Request
    reqs = [Request(f"r{i}", list(range(prompt)), SamplingParams(temperature=0.0, max_tokens=max_tokens))
            for i in range(n)]
    for r in reqs:
        r.num_computed_tokens = r.num_tokens - 1  # decoding: its last token is next
    return reqs


@pytest.mark.parametrize("backlog,batch,drafts,catchup_rate", [
    (0, 16, True, None), (285, 16, False, None), (285, 1, True, None), (0, 1, True, None),
    (285, 16, True, 0.00001)])  # a catch-up 46x cheaper per token than a pass's row pays at B = 16
def test_a_draft_models_catch_up_is_priced_against_what_its_drafts_bring(backlog, batch, drafts, catchup_rate):
    """The q8 self-draft's numbers on the fp32 path: a pass costs 6 ms + 0.46 ms per row,
    drafts are all accepted. A request whose draft KV must first catch up on a 285-token
    prompt with 64 tokens to go pays 285 x 0.46 ms once: at batch 1 (36 ms per token
    without drafts) that is repaid within a step and it drafts; at batch 16 (3.4 ms per
    token) it never is, while a request already caught up still drafts there. Measured
    before this rule (fixed k = 4, 32 grounded prompts, B = 16): 92.6 tok/s vs 122.1
    without drafts, 7.3 s of the 21.4 s spent catching up."""
    from engine.spec.decoder import SpeculativeDecoder
    ctl = DraftController(8, measured_fp32_table(), draft_latency=LatencyModel(0.006, 0.00046),
                          catchup_per_token=catchup_rate)
    for i in range(batch):
        for _ in range(20):
            ctl.observe(f"r{i}", 8, 8)
    decoder = SpeculativeDecoder(_AlwaysDrafts(backlog), ctl)
    reqs = _decoding(batch)
    decoder.propose(reqs)
    ks = [len(r.draft_token_ids) for r in reqs]
    assert all(k > 0 for k in ks) if drafts else not any(ks), ks


@pytest.mark.parametrize("prefilling,admitted,joining_prompt,behind_drafts", [
    (0, 0, 285, True), (15, 0, 285, False), (0, 15, 285, False), (7, 8, 285, False), (1, 0, 285, True),
    (0, 15, 20, True)])
def test_a_catch_up_is_priced_at_the_batch_its_request_is_about_to_be_in(prefilling, admitted, joining_prompt,
                                                                          behind_drafts):
    """The q8 self-draft's numbers as above. One request decodes while others prefill (or
    wait for a seat): at batch 1 its catch-up on 285 prompt tokens would pay, but 15 rows
    of 285-token prompts about to join make it a B = 16 request where no one drafts, and it
    does not catch up (the server's grounded B = 16 caught up on 4 such prompts in its first
    steps and never drafted again: 0.91x of no speculation). One row joining leaves it at
    B = 2, where it pays; 15 rows of 20-token prompts make a batch that drafts (each row's
    catch-up is small), where it pays too. A request already caught up is priced at the
    batch of the moment, rows to come or not."""
    from engine.request import Request
    from engine.spec.decoder import SpeculativeDecoder

    class Behind(_AlwaysDrafts):  # the draft model has nothing of any request but "ready"
        def backlog(self, request_id, num_computed_tokens):
            return 0 if request_id == "ready" else num_computed_tokens

    ctl = DraftController(8, measured_fp32_table(), draft_latency=LatencyModel(0.006, 0.00046))
    for rid in ("behind", "ready"):
        for _ in range(20):
            ctl.observe(rid, 8, 8)
    decoder = SpeculativeDecoder(Behind(0), ctl)
    for rid in ("behind", "ready"):
        req = _decoding(1)[0]
        req.request_id = rid
        joining = [Request(f"j{i}", list(range(joining_prompt)), SamplingParams(max_tokens=64))
                   for i in range(prefilling + admitted)]
        decoder.propose([req, *joining[:prefilling]], joining[prefilling:])
        assert bool(req.draft_token_ids) == (behind_drafts or rid == "ready"), (rid, req.draft_token_ids)
        assert not any(r.draft_token_ids for r in joining)
    # A request that drafted last step and had all its drafts accepted owes the draft model
    # its last draft (backlog 1): not a catch-up, so rows joining do not stop it drafting.
    req = _decoding(1)[0]
    req.request_id = "behind"
    joining = [Request(f"k{i}", list(range(joining_prompt)), SamplingParams(max_tokens=64)) for i in range(15)]
    decoder.drafter.backlog = lambda rid, n: 1 if rid == "behind" else n
    decoder.propose([req])  # drafting alone
    assert req.draft_token_ids
    decoder.propose([req], joining)
    assert req.draft_token_ids
    # Rows that join but can never draft are plain decodes in that batch: 15 constrained
    # requests under a drafter that drafts inside the step (each would draft if it could, as
    # the 20-token case above shows) leave the behind request alone in a B = 16 batch.
    class InStep(Behind):
        needs_runner = True

    decoder = SpeculativeDecoder(InStep(0), ctl)
    req = _decoding(1)[0]
    req.request_id = "behind2"
    for _ in range(20):
        ctl.observe("behind2", 8, 8)
    joining = [Request(f"c{i}", list(range(20)), SamplingParams(max_tokens=64)) for i in range(15)]
    for r in joining:
        r.matcher = object()  # constrained
    decoder.propose([req], joining)
    assert not req.draft_token_ids
    for r in joining:
        r.matcher = None
    decoder.propose([req], joining)
    assert req.draft_token_ids


@pytest.mark.parametrize("temperature,behind_drafts", [(0.0, True), (0.8, False)])
def test_rows_joining_at_a_temperature_are_priced_at_their_sampling_cost(temperature, behind_drafts):
    """As the (0, 15, 20) case above, with 6 of every 8 drafts accepted: a request behind on a
    285-token prompt, 15 rows of 20-token prompts about to join; greedy, that B = 16 batch
    drafts and the catch-up pays. With every row sampled at a temperature costing SAMPLE_MS
    a row beyond argmax, the joining rows' drafts do not pay, and neither does the catch-up.
    Priced as argmax rows (they were), the joining rows drafted and the request started it.
    (SAMPLE_MS is set to flip the decision: this CPU's probes measured 0.001-0.13 ms a row.)"""
    from engine.request import Request
    from engine.spec.decoder import SpeculativeDecoder

    class Behind(_AlwaysDrafts):
        def backlog(self, request_id, num_computed_tokens):
            return num_computed_tokens

    table = measured_fp32_table()
    table.sample_cost = SAMPLE_MS / 1e3
    ctl = DraftController(8, table, draft_latency=LatencyModel(0.006, 0.00046))
    for _ in range(20):
        ctl.observe("behind", 8, 6)
    req = _decoding(1)[0]
    req.request_id = "behind"
    req.params = SamplingParams(temperature=temperature, max_tokens=64)
    joining = [Request(f"t{i}", list(range(20)), SamplingParams(temperature=temperature, max_tokens=64))
               for i in range(15)]
    SpeculativeDecoder(Behind(0), ctl).propose([req], joining)
    assert bool(req.draft_token_ids) == behind_drafts, req.draft_token_ids


SAMPLE_MS = 10.0


def test_a_pass_0_with_a_backlog_teaches_the_catch_up_rate_and_leaves_the_pass_line_alone():
    """The q8 self-draft at open chat B = 16: one-token passes take 6.4 ms at 1 row and 19.3
    ms at 16; a pass 0 catching up on 94 prompt tokens took 0.2 ms more per backlog token.
    Fitting those passes into the line as 110-token passes bent it (fixed 8-11 ms, 0.54-0.71
    ms per row); they now set the catch-up rate only, and one-token passes move the line."""
    line = LatencyModel.fit([(1, 0.0064), (16, 0.0193)])
    ctl = DraftController(8, measured_fp32_table(), draft_latency=line)
    d1, d16 = line.predict(1), line.predict(16)
    for _ in range(30):
        ctl.observe_draft_pass(16, 16 + 94, d16 + 94 * 0.0002)
    assert line.predict(1) == pytest.approx(d1) and line.predict(16) == pytest.approx(d16)
    assert ctl.catchup_per_token == pytest.approx(0.0002, rel=0.01)
    for _ in range(30):
        ctl.observe_draft_pass(16, 16, d16 + 0.005)  # the passes got slower
    assert line.predict(16) == pytest.approx(d16 + 0.005, rel=0.05)
    assert ctl.catchup_per_token == pytest.approx(0.0002, rel=0.01)
    # A pass 0 that fed one accepted last draft, with 3 ms of noise: a ratio of sums
    # barely moves (a mean of ratios would take a share of 3 ms per token).
    ctl.observe_draft_pass(16, 17, line.predict(16) + 0.003)
    assert ctl.catchup_per_token == pytest.approx(0.0002, rel=0.02)


def test_a_draft_models_last_draft_is_fed_next_step_and_priced():
    """One draft, always accepted, a draft pass of 30 ms per token against a 50 ms + 1 ms
    per token step: without its own KV the draft pays (1.97 tokens / 82 ms against 1 / 51
    ms); a draft model must also feed the accepted draft to itself in the next step's
    pass 0 (another ~29 ms expected), and then it does not."""
    def ctl():
        c = DraftController(1, LatencyModel(0.05, 0.001), draft_latency=LatencyModel(0.0, 0.03))
        for _ in range(20):
            c.observe("a", 1, 1)
        return c
    assert ctl().choose({"a": 1}, other_tokens=0) == {"a": 1}
    assert ctl().choose({"a": 1}, other_tokens=0, rows=StepRows(catchup={"a": 0.0})) == {"a": 0}


def test_rows_sampled_at_a_temperature_are_priced_and_learnt_apart_from_greedy_ones():
    """Probes sampled at temperature 1 made greedy verifications look 20% dearer at 144
    tokens (0.25 ms per row of softmax and cumsum over the vocabulary): the table keeps
    greedy knots plus a per-row sampling cost. A sampled step observed online updates the
    greedy knot with its sampling cost taken off, and a sampled request gets fewer drafts
    than a greedy one when sampling a row costs as much as the step's per-token cost."""
    table = LatencyTable([(1, 0.036), (16, 0.056), (144, 0.186)], ema=1.0, sample_cost=0.00025)
    table.observe(144, 0.186 + 144 * 0.00025, 144, 144)
    assert table.predict(144) == pytest.approx(0.186)
    assert table.predict(144, 144, 144) == pytest.approx(0.186 + 0.036)

    gains = [0.6, 0.45, 0.35, 0.25, 0.15, 0.1, 0.05, 0.02]  # each draft's P(accepted)

    def drafts(stochastic):
        ctl = DraftController(8, LatencyTable([(16, 0.056), (144, 0.186)], sample_cost=0.004))
        ids = [f"r{i}" for i in range(16)]
        rows = StepRows(dict.fromkeys(ids, gains), stochastic=ids if stochastic else ())
        plan = ctl.choose(dict.fromkeys(ids, 8), 0, rows)
        return sum(plan.values())
    # Greedy: a draft costs ~1 ms against 3.5 ms per committed token; sampled: 5 ms against 7.5.
    assert drafts(False) == 32 and drafts(True) == 0


def test_a_probe_caught_by_an_interruption_does_not_flatten_the_table(monkeypatch):
    """Probes take the best of their repeats, and a knot above a later one is lowered to
    it: a 3-token probe whose every repeat was interrupted (+15 ms) no longer makes the
    table flat from 3 to 9 tokens, so batch 1 still sees that 8 drafts cost 9 ms, not 16."""
    from engine.spec.decoder import measure_step_latency
    import engine.spec.decoder as decoder
    clock = [0.0]

    def probe(rows, per_row, temperature):
        n = rows * per_row
        clock[0] += 0.036 + 0.0012 * (n - 1) + (0.015 if n == 3 else 0.0)
        return True
    monkeypatch.setattr(decoder.time, "perf_counter", lambda: clock[0])
    table = measure_step_latency(probe, [(1, n) for n in range(1, 10)])
    assert table.predict(3) == pytest.approx(0.036 + 0.0012 * 3)  # lowered to the 4-token knot
    assert table.predict(9) - table.predict(2) == pytest.approx(0.0012 * 7)


def test_step_latency_probes_run_in_rounds_so_a_slow_spell_does_not_bend_the_table(monkeypatch):
    """The VM slows down for a spell as long as one round of probes (every shape once). Timed
    shape after shape (each best of 4 in a row), the shapes inside the spell were all 30%
    high and the table bent between neighbouring knots; in rounds, each shape is timed
    outside the spell too, so every knot is its true cost."""
    from engine.spec.decoder import measure_step_latency, probe_shapes
    import engine.spec.decoder as decoder
    shapes = probe_shapes(8, 144, 16)
    clock, calls = [0.0], [0]

    def cost(n):
        return 0.040 + 0.0015 * n

    def probe(rows, per_row, temperature):
        calls[0] += 1
        slow = 10 <= calls[0] < 10 + len(shapes)  # one round's worth of calls, after the warm-up
        clock[0] += cost(rows * per_row) * (1.3 if slow else 1.0)
        return True
    monkeypatch.setattr(decoder.time, "perf_counter", lambda: clock[0])
    table = measure_step_latency(probe, shapes)
    for rows, per_row in shapes:
        assert table.predict(rows * per_row, rows=rows) == pytest.approx(cost(rows * per_row), rel=1e-9), (rows, per_row)


def test_a_shape_without_kv_room_in_a_later_round_is_left_out_with_the_larger_ones(monkeypatch):
    """A probe that could not run (False) in round 2 drops its shape and the larger ones,
    though round 1 timed them; the sampling cost is then timed on the largest shape left."""
    from engine.spec.decoder import measure_step_latency
    import engine.spec.decoder as decoder
    clock, calls = [0.0], {}

    def probe(rows, per_row, temperature):
        n = rows * per_row
        calls[n] = calls.get(n, 0) + 1
        if n >= 12 and calls[n] >= 2:
            return False  # room for it in round 1 only
        clock[0] += 0.04 + 0.001 * n + (0.0003 * n if temperature > 0 else 0.0)
        return True
    monkeypatch.setattr(decoder.time, "perf_counter", lambda: clock[0])
    table = measure_step_latency(probe, [(1, 1), (1, 5), (1, 9), (6, 2), (10, 2)])
    assert table.knots == [1, 5, 9]
    assert table.sample_cost == pytest.approx(0.0003, rel=1e-6)


@pytest.mark.parametrize("gain_over_no_drafts,drafts", [(1.05, False), (1.15, True)])
def test_a_catch_up_starts_only_where_it_beats_no_drafts_by_a_margin(gain_over_no_drafts, drafts):
    """A catch-up is paid up front and repaid only if its forecasts hold, so a plan that
    starts one must beat the best plan without it by CATCHUP_MARGIN (10%), not the 2% that
    a request already drafting needs to switch. One
    request, one draft, a 50 ms step, free draft passes, a catch-up rate of 1 ms per backlog
    token: its backlog per future token is set so that drafting is priced at 1.05x and 1.15x
    the goodput of not drafting. Once caught up, the same request drafts at any gain."""
    ctl = DraftController(1, LatencyModel(0.05, 0.0), draft_latency=LatencyModel(0.0, 0.0),
                          catchup_per_token=0.001)
    for _ in range(20):
        ctl.observe("a", 1, 1)
    g = ctl.accept.gains("a", 1)[0]
    # goodput(k = 1) / goodput(k = 0) = 50 (1 + g) / (50 + catchup (1 + g) + g), in ms
    catchup = ((50 * (1 + g) / gain_over_no_drafts - 50) - g) / (1 + g)
    assert ctl.choose({"a": 1}, other_tokens=0, rows=StepRows(catchup={"a": catchup})) == {"a": int(drafts)}
    assert ctl.choose({"a": 1}, other_tokens=0, rows=StepRows(catchup={"a": 0.0})) == {"a": 1}


@pytest.mark.parametrize("outputs,most", [(0, 8), (60, 3), (62, 1), (63, 0)])
def test_drafts_past_a_requests_token_budget_are_not_priced(outputs, most):
    """The scheduler keeps a fully accepted run within max_tokens (a request with r tokens
    to go verifies at most r - 1 drafts), so the controller is offered only those: a
    request 2 tokens from its end of 64, drafting at batch 1 where every draft pays, gets
    1 draft, not 8 of which 7 would be cut (and priced as if verified)."""
    from engine.spec.decoder import SpeculativeDecoder

    class Free(_AlwaysDrafts):
        keeps_kv = False

    ctl = DraftController(8, measured_fp32_table())
    for _ in range(20):
        ctl.observe("r0", 8, 8)
    decoder = SpeculativeDecoder(Free(0), ctl)
    req = _decoding(1)[0]
    req.append_output(list(range(outputs)))
    req.num_computed_tokens = req.num_tokens - 1
    decoder.propose([req])
    assert len(req.draft_token_ids) == most
