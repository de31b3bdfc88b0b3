"""loadtest/lockstep.py and spec_bench's paired summary, on fake engines (no model).

Lockstep: the engine with the fewest committed tokens steps next, so engines that commit
at different rates move through the workload together; each one's rate counts only its
own steps' time. The summary compares configurations round by round (a round's drift
cancels in its ratio), not best round against best round.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "loadtest"))

from lockstep import run_lockstep  # noqa: E402
from spec_bench import summarise  # noqa: E402


@dataclass
class _Stats:
    num_generation_tokens: int
    num_prompt_tokens: int = 0


@dataclass
class _Out:
    request_id: str
    finished: bool
    outputs: list


@dataclass
class _Completion:
    token_ids: list


@dataclass
class _FakeCore:
    """Commits `per_step` tokens a step to one request at a time, `total` each."""
    per_step: int
    total: int
    log: list
    name: str
    queue: list = field(default_factory=list)
    done: int = 0

    def add_request(self, rid, prompt, params):
        self.queue.append(rid)

    def has_unfinished(self):
        return bool(self.queue)

    def step(self):
        self.log.append(self.name)
        n = min(self.per_step, self.total - self.done)
        self.done += n
        outs = []
        if self.done == self.total:
            outs.append(_Out(self.queue.pop(0), True, [_Completion(list(range(self.total)))]))
            self.done = 0
        return outs, _Stats(n)


@dataclass
class _FakeLLM:
    core: _FakeCore


def test_the_engine_with_the_fewest_committed_tokens_steps_next():
    from engine.sampling_params import SamplingParams

    log: list[str] = []
    engines = {"slow": _FakeLLM(_FakeCore(1, 12, log, "slow")), "fast": _FakeLLM(_FakeCore(4, 12, log, "fast"))}
    lanes = run_lockstep(engines, ["a", "b"], SamplingParams(max_tokens=12))
    # slow first (a tie, listed first), then fast (4 tokens); slow catches up to 4, and at
    # the tie the lane that stepped least (fast) goes, and so on.
    assert log[:10] == ["slow", "fast", "slow", "slow", "slow", "fast", "slow", "slow", "slow", "slow"]
    tokens = {"slow": 0, "fast": 0}
    for name in log:  # never more than one fast step ahead
        tokens[name] += engines[name].core.per_step
        assert abs(tokens["fast"] - tokens["slow"]) <= 4
    assert [lane.steps for lane in lanes] == [24, 6] and [lane.tokens for lane in lanes] == [24, 24]
    assert lanes[0].outputs == lanes[1].outputs == [list(range(12))] * 2


def test_the_summary_pairs_rounds_rather_than_best_rounds():
    """Round 1 ran in fast minutes, round 2 in slow ones. Adaptive was 0.95x and 1.10x of no
    speculation within the rounds: 1.022x paired, where its best round against no
    speculation's (95 vs 100, both of round 1) would say 0.95x. The best other
    configuration is chosen by the same paired ratio."""
    rows = [{"mode": "offline", "workload": "w", "batch": 4, "config": c, "tokens_per_s": 0.0,
             "rounds_tok_s": r, "rounds_decode_tok_s": r}
            for c, r in (("no spec", [100.0, 60.0]), ("k=2", [104.0, 63.0]), ("adaptive", [95.0, 66.0]))]
    (s,) = summarise(rows)
    assert s["speedup_vs_no_spec"] == pytest.approx((0.95 * 1.10) ** 0.5)
    assert s["best_other"] == "k=2"  # 1.04x and 1.05x
    assert s["ratio_vs_best_other"] == pytest.approx((95 / 104 * 66 / 63) ** 0.5)
    assert s["decode_ratio_vs_best_other"] == pytest.approx(s["ratio_vs_best_other"])


def test_server_rows_pair_their_mean_request_latency_too():
    """Server rows carry each round's mean request latency; the summary pairs it by round
    as it pairs the rates (adaptive 1.2 s vs 1.0 s, then 0.9 s vs 1.0 s). Offline rows have
    no latency and get no such figure."""
    rows = [{"mode": "server", "workload": "w", "batch": 16, "config": c, "tokens_per_s": 0.0,
             "rounds_tok_s": r, "rounds_latency_s": lat}
            for c, r, lat in (("no spec", [100.0, 90.0], [1.0, 1.0]), ("adaptive", [95.0, 99.0], [1.2, 0.9]))]
    rows += [{"mode": "offline", "workload": "w", "batch": 16, "config": c, "tokens_per_s": 1.0, "rounds_tok_s": [1.0]}
             for c in ("no spec", "adaptive")]
    offline, server = summarise(rows)
    assert server["latency_vs_no_spec"] == pytest.approx((1.2 * 0.9) ** 0.5)
    assert server["speedup_vs_no_spec"] == pytest.approx((0.95 * 1.1) ** 0.5)
    assert "latency_vs_no_spec" not in offline
