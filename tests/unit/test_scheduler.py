"""Unit tests for engine/sched/scheduler.py, driven by a fake model runner.

Pure CPU, no model. The fake runner samples a token that depends only on
(request id, position), so a request's output is the same however it was
batched, chunked or preempted. A fake KV store records what each step writes
into (block, slot) and checks that everything a step reads (positions before
`start`, possibly from the prefix cache) holds the right prefix's KV.
"""
from __future__ import annotations

import random
import zlib
from collections.abc import Callable

import pytest

from engine.config import SchedulerConfig
from engine.kv.manager import KVCacheManager, cdiv
from engine.request import Request, RequestStatus
from engine.sampling_params import SamplingParams
from engine.sched.output import ModelRunnerOutput, SchedulerOutput
from engine.sched.scheduler import Scheduler
from engine.spec.verify import accept_drafts


def token_for(request_id: str, position: int) -> int:
    return zlib.crc32(f"{request_id}@{position}".encode()) % 1000


def expected_output(req: Request) -> list[int]:
    return [token_for(req.request_id, req.num_prompt_tokens + i) for i in range(req.params.max_tokens)]


def fake_runner(sched_out: SchedulerOutput) -> ModelRunnerOutput:
    """The target's token at each sampled position; drafts verified as the real runner does."""
    ids, toks = [], []
    for e in sched_out.scheduled:
        if e.sample:
            ids.append(e.request_id)
            k = e.num_draft_tokens
            first = e.start + e.num_tokens - k  # position of the first sampled token
            toks.append(accept_drafts(e.draft_token_ids,
                                      [token_for(e.request_id, first + i) for i in range(k + 1)]))
    return ModelRunnerOutput(tuple(ids), tuple(toks))


class Harness:
    """A scheduler + KV manager, a fake runner, and per-step checks of the scheduler's contract."""

    def __init__(self, num_blocks: int = 64, block_size: int = 16, max_num_seqs: int = 8,
                 max_num_batched_tokens: int = 64, enable_prefix_caching: bool = True,
                 draft: "Callable[[Request], list[int]] | None" = None):
        self.draft = draft  # speculation: drafts for a decoding request before each step
        self.bs = block_size
        self.total = num_blocks
        self.kv = KVCacheManager(num_blocks, block_size, enable_prefix_caching)
        self.config = SchedulerConfig(max_num_seqs, max_num_batched_tokens, max_model_len=4096,
                                      shared_prefix_groups=True)
        self.sched = Scheduler(self.config, self.kv)
        self.reqs: dict[str, Request] = {}
        self.store: dict[tuple[int, int], int] = {}  # (block, slot) -> KV "content"
        self.chains: dict[str, list[int]] = {}
        self.history: list[SchedulerOutput] = []
        self.admit_order: list[str] = []

    def add(self, rid: str, prompt, max_tokens: int = 4, **kw) -> Request:
        req = Request(rid, list(prompt), SamplingParams(max_tokens=max_tokens), **kw)
        self.reqs[rid] = req
        self.sched.add_request(req)
        return req

    # -- fake KV contents: position p of a sequence holds a hash of its tokens [0, p]
    def _chain(self, req: Request, drafts=()) -> list[int]:
        chain = self.chains.setdefault(req.request_id, [])
        prev = chain[-1] if chain else 0x1234
        for p in range(len(chain), req.num_tokens):
            prev = hash((prev, req.token_ids[p]))
            chain.append(prev)
        extra = []  # the drafts' positions: written this step, kept only if accepted
        for tok in drafts:
            prev = hash((prev, tok))
            extra.append(prev)
        return chain + extra

    def _check_kv(self, out: SchedulerOutput) -> None:
        bs, pool = self.bs, self.kv.pool
        writes: dict[tuple[int, int], int] = {}
        for e in out.scheduled:
            chain = self._chain(e.request, e.draft_token_ids)
            for p in range(e.start):  # reads, including prefix-cache hits
                assert self.store.get((e.block_ids[p // bs], p % bs)) == chain[p], (e.request_id, p)
            for p in range(e.start, e.start + e.num_tokens):
                blk = e.block_ids[p // bs]
                assert pool.blocks[blk].ref_count == 1, "writing into a shared block"
                assert pool.blocks[blk].block_hash is None, "writing into a cached block"
                assert (blk, p % bs) not in writes, "two writers in one step"
                writes[(blk, p % bs)] = chain[p]
        self.store.update(writes)

    def _check_output(self, out: SchedulerOutput, running_before: list[Request],
                      outputs_before: dict[str, list[int]]) -> None:
        cfg, sched = self.config, self.sched
        assert out.num_batched_tokens <= cfg.max_num_batched_tokens
        assert out.num_batched_tokens == sum(e.num_tokens for e in out.scheduled)
        assert len(out.scheduled) <= cfg.max_num_seqs and len(sched.running) <= cfg.max_num_seqs
        ids = [e.request_id for e in out.scheduled]
        assert len(set(ids)) == len(ids)
        was_running = [e.request in running_before for e in out.scheduled]
        assert was_running == sorted(was_running, reverse=True), "running requests go first"
        for e in out.scheduled:
            req = e.request
            assert req.status is RequestStatus.RUNNING and req in sched.running
            assert e.num_tokens >= 1
            assert e.start == req.num_computed_tokens
            committed_end = e.start + e.num_tokens - e.num_draft_tokens
            assert e.sample == (committed_end == req.num_tokens)
            assert committed_end <= req.num_tokens
            if e.num_draft_tokens:
                assert e.num_draft_tokens + 1 == e.num_tokens and committed_end == req.num_tokens
                assert req.num_output_tokens + e.num_tokens <= req.params.max_tokens
            assert len(e.block_ids) >= cdiv(e.start + e.num_tokens, self.bs)
            assert tuple(self.kv.block_table(e.request_id)) == e.block_ids
            if not was_running[ids.index(e.request_id)]:
                self.admit_order.append(e.request_id)
        # Preemption: newest running first, reset, back to waiting in (priority, arrival)
        # order, outputs kept.
        k = len(out.preempted_ids)
        assert list(out.preempted_ids) == [r.request_id for r in reversed(running_before)][:k]
        keys = [(r.priority, r.arrival_time) for r in sched.waiting]
        assert keys == sorted(keys)
        for rid in out.preempted_ids:
            req = self.reqs[rid]
            assert req.status is RequestStatus.WAITING and req.num_computed_tokens == 0
            assert req.output_token_ids == outputs_before[rid]
            assert self.kv.block_table(rid) == []
            assert rid not in ids
        if k:
            assert all(was_running), "no admission in a step that preempted"
        self._check_groups(out)

    def _check_groups(self, out: SchedulerOutput) -> None:
        """Each level's members hold the same computed blocks; a nested level starts where
        its parent (the nearest earlier level holding all its members) ends."""
        for i, g in enumerate(out.prefix_groups):
            assert len(g.rows) >= 2 and len(set(g.rows)) == len(g.rows) and g.num_blocks >= 1
            entries = [out.scheduled[r] for r in g.rows]
            span = {e.block_ids[g.first_block:g.first_block + g.num_blocks] for e in entries}
            assert len(span) == 1, "members hold different blocks"
            for e in entries:
                assert (g.first_block + g.num_blocks) * self.bs <= e.start, "a level is computed"
            parents = [p for p in out.prefix_groups[:i] if set(g.rows) < set(p.rows)]
            if parents:
                assert g.first_block == parents[-1].first_block + parents[-1].num_blocks
            else:
                assert g.first_block == 0

    def step(self) -> SchedulerOutput:
        if self.draft is not None:
            for req in self.sched.running:
                decoding = req.num_computed_tokens + 1 == req.num_tokens
                req.draft_token_ids = self.draft(req) if decoding else []
        running_before = list(self.sched.running)
        outputs_before = {r.request_id: list(r.output_token_ids) for r in running_before}
        out = self.sched.schedule()
        self._check_output(out, running_before, outputs_before)
        self._check_kv(out)
        self.history.append(out)
        produced = self.sched.update(out, fake_runner(out))
        drafted = {e.request_id: e.num_draft_tokens for e in out.scheduled}
        for req, new_ids in produced:
            assert 1 <= len(new_ids) <= drafted[req.request_id] + 1
            assert req.num_output_tokens <= req.params.max_tokens
            if drafted[req.request_id]:  # rollback: no block beyond what the computed tokens need
                assert len(self.kv.block_table(req.request_id)) == cdiv(req.num_computed_tokens, self.bs)
                assert req.num_computed_tokens + 1 == req.num_tokens
            if req.num_output_tokens >= req.params.max_tokens:
                assert self.sched.finish_request(req.request_id, "length") is req
        self.kv.pool.check_invariants()
        return out

    def run(self, max_steps: int = 5000) -> int:
        steps = 0
        while self.sched.num_unfinished:
            self.step()
            steps += 1
            assert steps < max_steps, "no progress"
        self.assert_no_leak()
        return steps

    def assert_no_leak(self) -> None:
        assert self.kv.num_free_blocks == self.total
        assert self.kv.req_blocks == {}
        assert not self.sched.running and not self.sched.waiting

    def outputs(self) -> dict[str, list[int]]:
        return {rid: list(r.output_token_ids) for rid, r in self.reqs.items()}


def prompt(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1000, 30000) for _ in range(n)]


# ---------------------------------------------------------------------------


def test_single_request_prefill_then_decode():
    h = Harness()
    r = h.add("r", prompt(1, 5), max_tokens=4)
    out = h.step()
    assert [(e.start, e.num_tokens, e.sample) for e in out.scheduled] == [(0, 5, True)]
    assert out.num_prefill_tokens == 5
    for i in range(3):
        out = h.step()
        assert [(e.start, e.num_tokens, e.sample) for e in out.scheduled] == [(5 + i, 1, True)]
        assert out.num_prefill_tokens == 0
    assert r.is_finished and r.finish_reason == "length"
    assert r.output_token_ids == expected_output(r)
    assert h.sched.schedule().is_empty
    h.assert_no_leak()


def test_chunked_prefill_only_last_chunk_samples():
    h = Harness(max_num_batched_tokens=32)
    r = h.add("long", prompt(2, 100), max_tokens=2)
    shapes = []
    for _ in range(4):
        out = h.step()
        shapes.append([(e.start, e.num_tokens, e.sample) for e in out.scheduled])
        assert out.num_batched_tokens <= 32
    assert shapes == [[(0, 32, False)], [(32, 32, False)], [(64, 32, False)], [(96, 4, True)]]
    assert r.num_computed_tokens == 100 and r.num_output_tokens == 1
    h.run()
    assert r.output_token_ids == expected_output(r)


def test_budget_and_max_num_seqs_respected_under_load():
    h = Harness(num_blocks=200, max_num_seqs=3, max_num_batched_tokens=40)
    rng = random.Random(3)
    for i in range(10):
        h.add(f"r{i}", prompt(100 + i, rng.randint(1, 70)), max_tokens=rng.randint(1, 6))
    h.run()
    assert max(len(o.scheduled) for o in h.history) == 3
    assert max(o.num_batched_tokens for o in h.history) == 40
    for r in h.reqs.values():
        assert r.output_token_ids == expected_output(r)


def test_running_scheduled_before_waiting():
    h = Harness(max_num_batched_tokens=20)
    a = h.add("a", prompt(4, 6), max_tokens=8)
    h.step()  # a prefilled
    b = h.add("b", prompt(5, 50), max_tokens=2)
    out = h.step()
    assert [(e.request_id, e.num_tokens) for e in out.scheduled] == [("a", 1), ("b", 19)]
    out = h.step()
    assert [(e.request_id, e.num_tokens) for e in out.scheduled] == [("a", 1), ("b", 19)]
    h.run()
    assert a.output_token_ids == expected_output(a) and b.output_token_ids == expected_output(b)


def test_fcfs_admission():
    h = Harness(max_num_seqs=2)
    for i, rid in enumerate("ABCDE"):
        h.add(rid, prompt(10 + i, 8), max_tokens=3 + i)
    out = h.step()
    assert [e.request_id for e in out.scheduled] == ["A", "B"]
    assert [r.request_id for r in h.sched.waiting] == ["C", "D", "E"]
    h.run()
    assert h.admit_order == ["A", "B", "C", "D", "E"]


def test_next_admitted_is_the_waiting_head_as_far_as_seats_are_free():
    h = Harness(max_num_seqs=3)
    for i, rid in enumerate("ABCDEF"):
        h.add(rid, prompt(40 + i, 8), max_tokens=4, priority=1 if rid == "F" else 0)
    assert [r.request_id for r in h.sched.next_admitted()] == ["A", "B", "C"]
    h.step()  # A, B, C admitted: no seat left
    assert h.sched.next_admitted() == []
    h.sched.finish_request("B", "abort")  # one seat
    assert [r.request_id for r in h.sched.next_admitted()] == ["D"]
    h.run()


def test_next_admitted_stops_where_kv_blocks_run_out_and_counts_prefix_hits():
    """6 blocks of 16: A (40 tokens, 3 blocks with its first decode) and B (30, 2) fit, C
    (40, 3) does not and holds D back, as admission does. Then E, first in line, shares
    A's two full blocks: it needs 1 block of the 1 left, and is admitted next."""
    h = Harness(num_blocks=6, block_size=16, max_num_seqs=8, max_num_batched_tokens=512)
    a = h.add("A", prompt(20, 40), max_tokens=3)
    for rid, seed, n in (("B", 21, 30), ("C", 22, 40), ("D", 23, 5)):
        h.add(rid, prompt(seed, n), max_tokens=3)
    assert [r.request_id for r in h.sched.next_admitted()] == ["A", "B"]
    assert [e.request_id for e in h.step().scheduled] == ["A", "B"]
    assert h.sched.next_admitted() == []  # C first: 3 blocks, 1 free
    h.add("E", a.token_ids[:32] + prompt(24, 3), max_tokens=3, priority=-1)
    assert [r.request_id for r in h.sched.next_admitted()] == ["E"]
    assert "E" in [e.request_id for e in h.step().scheduled]
    h.run()


def test_head_of_line_waits_for_blocks():
    # C needs more blocks than are free; D (small) must not overtake it.
    h = Harness(num_blocks=6, block_size=16, max_num_seqs=8, max_num_batched_tokens=512)
    h.add("A", prompt(20, 40), max_tokens=3)  # 3 blocks
    h.add("B", prompt(21, 30), max_tokens=3)  # 2 blocks
    h.add("C", prompt(22, 40), max_tokens=3)  # 3 blocks: does not fit
    h.add("D", prompt(23, 5), max_tokens=3)  # 1 block: would fit
    out = h.step()
    assert [e.request_id for e in out.scheduled] == ["A", "B"]
    h.run()
    assert h.admit_order == ["A", "B", "C", "D"]


def test_priority_lower_value_first_then_fcfs():
    h = Harness(max_num_seqs=1)
    h.add("low", prompt(30, 4), max_tokens=2, priority=2)
    h.add("high", prompt(31, 4), max_tokens=2, priority=0)
    h.add("mid", prompt(32, 4), max_tokens=2, priority=1)
    h.add("high2", prompt(33, 4), max_tokens=2, priority=0)
    h.add("low2", prompt(34, 4), max_tokens=2, priority=2)
    assert [r.request_id for r in h.sched.waiting] == ["high", "high2", "mid", "low", "low2"]
    h.run()
    assert h.admit_order == ["high", "high2", "mid", "low", "low2"]


def test_priority_does_not_preempt_running():
    h = Harness(max_num_seqs=1)
    h.add("low", prompt(35, 4), max_tokens=3, priority=5)
    h.step()
    h.add("high", prompt(36, 4), max_tokens=3, priority=0)
    out = h.step()
    assert [e.request_id for e in out.scheduled] == ["low"]
    h.run()
    assert h.admit_order == ["low", "high"]


def _preemption_workload(h: Harness) -> None:
    for i in range(6):
        h.add(f"p{i}", prompt(40 + i, 10), max_tokens=12)


def test_preemption_when_blocks_run_out_keeps_outputs():
    ample = Harness(num_blocks=64, block_size=4, max_num_seqs=6, max_num_batched_tokens=64)
    _preemption_workload(ample)
    ample.run()
    assert ample.sched.num_preemptions == 0

    tight = Harness(num_blocks=12, block_size=4, max_num_seqs=6, max_num_batched_tokens=64)
    _preemption_workload(tight)
    tight.run()  # every step checks: newest preempted, reset to 0, front of waiting, outputs kept
    assert tight.sched.num_preemptions > 0
    preempted = [rid for o in tight.history for rid in o.preempted_ids]
    assert len(preempted) == tight.sched.num_preemptions
    assert sum(r.num_preemptions for r in tight.reqs.values()) == tight.sched.num_preemptions
    # Some request was preempted after it had produced output (recomputed, not lost).
    assert any(r.num_preemptions and r.num_output_tokens > 1 for r in tight.reqs.values())
    assert tight.outputs() == ample.outputs()
    for r in tight.reqs.values():
        assert r.output_token_ids == expected_output(r)


def test_preempted_request_resumes_with_its_outputs():
    h = Harness(num_blocks=5, block_size=4, max_num_seqs=2, max_num_batched_tokens=64)
    a = h.add("a", prompt(50, 7), max_tokens=10)  # grows to 4 blocks
    b = h.add("b", prompt(51, 7), max_tokens=10)
    while not h.history or not h.history[-1].preempted_ids:
        h.step()
    out = h.history[-1]
    assert out.preempted_ids == ("b",)
    assert b.status is RequestStatus.WAITING and b.num_computed_tokens == 0
    assert b.num_output_tokens >= 1 and h.sched.waiting.peek() is b
    assert [e.request_id for e in out.scheduled] == ["a"]
    kept = list(b.output_token_ids)
    h.run()
    assert b.output_token_ids[:len(kept)] == kept
    assert a.output_token_ids == expected_output(a) and b.output_token_ids == expected_output(b)


def test_request_preempts_itself_when_alone_and_out_of_blocks():
    h = Harness(num_blocks=3, block_size=4, max_num_seqs=2, max_num_batched_tokens=64)
    a = h.add("a", prompt(52, 6), max_tokens=6)  # needs 3 blocks at most: fits alone
    b = h.add("b", prompt(53, 3), max_tokens=6)
    h.run()
    assert h.sched.num_preemptions >= 1
    assert a.output_token_ids == expected_output(a) and b.output_token_ids == expected_output(b)


def test_abort_waiting_request():
    h = Harness(max_num_seqs=1)
    h.add("a", prompt(60, 20), max_tokens=4)
    w = h.add("w", prompt(61, 20), max_tokens=4)
    h.step()
    assert w.status is RequestStatus.WAITING
    assert h.sched.finish_request("w", "abort") is w
    assert w.is_finished and w.finish_reason == "abort"
    assert w not in h.sched.waiting and "w" not in h.sched.requests
    assert h.sched.finish_request("w", "abort") is None
    assert h.sched.finish_request("nobody", "abort") is None
    h.run()
    assert h.admit_order == ["a"]


def test_abort_running_request_frees_blocks_at_once():
    h = Harness(num_blocks=16, block_size=4)
    a = h.add("a", prompt(62, 10), max_tokens=8)
    b = h.add("b", prompt(63, 30), max_tokens=8)
    h.step()
    h.step()
    assert b.status is RequestStatus.RUNNING
    used_by_a = len(h.kv.block_table("a"))
    assert used_by_a >= 3
    free_before = h.kv.num_free_blocks
    assert h.sched.finish_request("a", "abort") is a
    assert h.kv.num_free_blocks == free_before + used_by_a
    assert h.kv.block_table("a") == [] and a not in h.sched.running
    h.sched.finish_request("b", "abort")
    h.assert_no_leak()


def test_abort_while_step_runs_is_ignored_by_update():
    h = Harness()
    a = h.add("a", prompt(64, 10), max_tokens=8)
    b = h.add("b", prompt(65, 10), max_tokens=3)
    h.step()
    out = h.sched.schedule()
    h._check_kv(out)  # the step "runs" ...
    computed = a.num_computed_tokens
    h.sched.finish_request("a", "abort")  # ... and a is aborted meanwhile
    produced = h.sched.update(out, fake_runner(out))
    assert [r.request_id for r, _ in produced] == ["b"]
    assert a.num_computed_tokens == computed and a.num_output_tokens == 1
    assert h.kv.block_table("a") == []
    h.kv.pool.check_invariants()
    h.run()
    assert b.output_token_ids == expected_output(b)


def test_abort_preempted_request():
    h = Harness(num_blocks=5, block_size=4, max_num_seqs=2)
    h.add("a", prompt(66, 7), max_tokens=10)
    b = h.add("b", prompt(67, 7), max_tokens=10)
    while not h.history or not h.history[-1].preempted_ids:
        h.step()
    assert b.status is RequestStatus.WAITING and b.num_output_tokens >= 1
    assert h.sched.finish_request("b", "abort") is b
    assert b not in h.sched.waiting
    h.run()


def test_siblings_wait_for_leader_then_hit_its_blocks():
    h = Harness(num_blocks=32, block_size=16, max_num_batched_tokens=24)
    p = prompt(70, 40)  # 2 full blocks + 8 tokens
    lead = h.add("g#0", p, max_tokens=3)
    s1 = h.add("g#1", p, max_tokens=3, prefix_leader=lead)
    s2 = h.add("g#2", p, max_tokens=3, prefix_leader=lead)
    out = h.step()
    assert [(e.request_id, e.num_tokens) for e in out.scheduled] == [("g#0", 24)]
    out = h.step()  # budget left over, but the siblings still wait
    assert [(e.request_id, e.num_tokens) for e in out.scheduled] == [("g#0", 16)]
    assert s1.status is RequestStatus.WAITING and s2.status is RequestStatus.WAITING
    out = h.step()
    assert [(e.request_id, e.start, e.num_tokens) for e in out.scheduled] == [
        ("g#0", 40, 1), ("g#1", 32, 8), ("g#2", 32, 8)]
    assert out.prefix_cache_hits == 2 * 32 and out.prefix_cache_queries == 2 * 40
    assert s1.num_cached_tokens == 32 and s2.num_cached_tokens == 32
    lead_blocks = h.kv.block_table("g#0")[:2]
    assert h.kv.block_table("g#1")[:2] == lead_blocks == h.kv.block_table("g#2")[:2]
    shared = h.kv.shared_prefixes(["g#0", "g#1", "g#2"])
    assert [(s.block_ids, s.request_ids) for s in shared] == [(tuple(lead_blocks), ("g#0", "g#1", "g#2"))]
    h.run()
    for r in (lead, s1, s2):
        assert r.output_token_ids == expected_output(r)


def test_waiting_sibling_is_skipped_not_a_barrier():
    """Head-of-line: an unrelated request queued behind a sibling that must wait for its
    leader's prompt is admitted with the leftover budget in the same step."""
    h = Harness(num_blocks=32, block_size=16, max_num_batched_tokens=24)
    p = prompt(75, 40)
    lead = h.add("g#0", p, max_tokens=3)
    sib = h.add("g#1", p, max_tokens=3, prefix_leader=lead)
    other = h.add("u", prompt(76, 6), max_tokens=3)
    h.step()  # the leader takes the whole budget
    out = h.step()  # leader: 16 tokens; 8 left: the sibling waits, "u" (6 tokens) goes
    assert [(e.request_id, e.num_tokens) for e in out.scheduled] == [("g#0", 16), ("u", 6)]
    assert sib.status is RequestStatus.WAITING and list(h.sched.waiting) == [sib]
    h.run()
    for r in (lead, sib, other):
        assert r.output_token_ids == expected_output(r)
    assert sib.num_cached_tokens == 32  # and it still shared the leader's blocks


def test_waiting_queue_order_removal_and_reinsertion():
    from engine.sched.waiting import WaitingQueue
    rng = random.Random(5)
    q = WaitingQueue()
    reqs = [Request(f"r{i}", [1], SamplingParams(), priority=rng.choice([0, 1, 2]),
                    arrival_time=rng.choice([1.0, 2.0, 3.0])) for i in range(200)]
    for r in reqs:
        q.push(r)
    removed = set(rng.sample(reqs, 50))
    for r in removed:
        assert q.remove(r)
        assert not q.remove(r)
    with pytest.raises(ValueError):
        q.push(reqs[0] if reqs[0] not in removed else next(r for r in reqs if r not in removed))
    live = [r for r in reqs if r not in removed]
    # (priority, arrival), then insertion order for equal keys
    expected = sorted(live, key=lambda r: (r.priority, r.arrival_time, reqs.index(r)))
    assert len(q) == len(live) and list(q) == expected and q.peek() is expected[0]
    assert q.first(7) == expected[:7] and q.first(0) == [] and q.first(len(q) + 5) == expected
    popped = [q.pop() for _ in range(len(q))]
    assert popped == expected and not q and q.peek() is None
    q.push(reqs[0])
    assert reqs[0] in q and list(q) == [reqs[0]]


def test_siblings_do_not_wait_for_finished_leader():
    h = Harness(num_blocks=32, block_size=16, max_num_seqs=1)
    p = prompt(71, 40)
    lead = h.add("g#0", p, max_tokens=1)
    sib = h.add("g#1", p, max_tokens=2, prefix_leader=lead)
    h.step()
    assert lead.is_finished
    out = h.step()
    assert [(e.request_id, e.start) for e in out.scheduled] == [("g#1", 32)]
    h.run()
    assert sib.output_token_ids == expected_output(sib)


def test_siblings_without_prefix_caching_do_not_wait():
    h = Harness(num_blocks=32, block_size=16, max_num_batched_tokens=128, enable_prefix_caching=False)
    p = prompt(72, 40)
    lead = h.add("g#0", p, max_tokens=2)
    h.add("g#1", p, max_tokens=2, prefix_leader=lead)
    out = h.step()
    assert [(e.request_id, e.num_tokens) for e in out.scheduled] == [("g#0", 40), ("g#1", 40)]
    h.run()


def test_prefix_hit_across_requests_and_metrics():
    h = Harness(num_blocks=32, block_size=16, max_num_batched_tokens=256)
    system = prompt(73, 48)
    a = h.add("a", system + prompt(74, 5), max_tokens=2)
    h.run()
    b = h.add("b", system + prompt(75, 7), max_tokens=2)
    out = h.step()
    assert [(e.request_id, e.start, e.num_tokens) for e in out.scheduled] == [("b", 48, 7)]
    assert out.prefix_cache_queries == 55 and out.prefix_cache_hits == 48
    assert out.num_prefill_tokens == 7
    assert b.num_cached_tokens == 48 and a.num_cached_tokens == 0
    h.run()
    assert b.output_token_ids == expected_output(b)


def test_fcfs_within_priority_after_preemption():
    """Waiting stays ordered by (priority, arrival) through preemptions: a preempted
    request re-enters by its original arrival, and a newcomer never overtakes older
    requests of its own priority."""
    h = Harness(num_blocks=5, block_size=4, max_num_seqs=2)
    h.add("x", prompt(80, 7), max_tokens=10, priority=0)
    h.add("low", prompt(81, 7), max_tokens=10, priority=5)
    h.step()
    a = h.add("A", prompt(82, 3), max_tokens=2, priority=0)  # wait: max_num_seqs reached
    b = h.add("B", prompt(83, 3), max_tokens=2, priority=0)
    while not h.history[-1].preempted_ids:
        h.step()
    waiting = list(h.sched.waiting)
    keys = [(r.priority, r.arrival_time) for r in waiting]
    assert keys == sorted(keys)
    preempted = h.reqs[h.history[-1].preempted_ids[0]]
    assert preempted in waiting and preempted.num_computed_tokens == 0
    c = h.add("C", prompt(84, 3), max_tokens=2, priority=0)
    waiting = list(h.sched.waiting)
    assert waiting.index(c) > max(waiting.index(r) for r in (a, b) if r in waiting)
    assert [(r.priority, r.arrival_time) for r in waiting] == sorted((r.priority, r.arrival_time) for r in waiting)


def noisy_drafter(rng: random.Random, max_k: int = 6) -> Callable[[Request], list[int]]:
    """Drafts the true next tokens, each wrong with probability 0.3 (rejections at any position)."""
    def draft(req: Request) -> list[int]:
        return [token_for(req.request_id, req.num_tokens + i) if rng.random() < 0.7 else 99_999
                for i in range(rng.randint(0, max_k))]
    return draft


def test_speculation_same_outputs_under_preemption_and_releases_rejected_blocks():
    plain = Harness(num_blocks=12, block_size=4, max_num_seqs=6, max_num_batched_tokens=64)
    _preemption_workload(plain)
    plain.run()
    spec = Harness(num_blocks=12, block_size=4, max_num_seqs=6, max_num_batched_tokens=64,
                   draft=noisy_drafter(random.Random(5)))
    _preemption_workload(spec)
    spec_steps = spec.run()  # every step: drafts within budget / max_tokens, rollback, no leak
    assert spec.outputs() == plain.outputs()
    drafted = [e for o in spec.history for e in o.scheduled if e.num_draft_tokens]
    assert drafted and spec.sched.num_preemptions > 0
    assert spec_steps < len(plain.history)  # accepted drafts commit several tokens a step


def test_drafts_are_capped_by_budget_max_tokens_and_model_len():
    h = Harness(max_num_batched_tokens=8)
    req = h.add("a", prompt(1, 5), max_tokens=3)
    h.step()  # prefill, first token
    req.draft_token_ids = [1, 2, 3, 4, 5, 6]
    out = h.sched.schedule()
    assert out.scheduled[0].draft_token_ids == (1,)  # 1 + k <= max_tokens - outputs (3 - 1)
    h.sched.update(out, fake_runner(out))
    h2 = Harness(max_num_batched_tokens=3)
    r2 = h2.add("b", prompt(2, 2), max_tokens=50)
    h2.step()
    r2.draft_token_ids = [7] * 10
    assert h2.sched.schedule().scheduled[0].num_tokens == 3  # budget: 1 + 2 drafts
    h3 = Harness()
    h3.sched.config = SchedulerConfig(8, 64, max_model_len=8)
    r3 = h3.add("c", prompt(3, 5), max_tokens=50)
    h3.sched.schedule()
    r3.num_computed_tokens = 5
    r3.append_output([11])
    r3.draft_token_ids = [7] * 10
    # 6 tokens now; a full run commits k + 1 more, so k <= 8 - 6 - 1
    assert h3.sched.schedule().scheduled[0].draft_token_ids == (7,)


@pytest.mark.parametrize("seed,spec", [(s, False) for s in range(6)] + [(s, True) for s in range(4)])
def test_random_workload_with_preemption_and_aborts(seed, spec):
    rng = random.Random(seed)
    bs = rng.choice([2, 4, 8])
    max_prompt, max_out = 40, 12
    h = Harness(num_blocks=cdiv(max_prompt + max_out, bs) + rng.randint(0, 12), block_size=bs,
                max_num_seqs=rng.randint(1, 6), max_num_batched_tokens=rng.randint(8, 64),
                draft=noisy_drafter(random.Random(seed + 100)) if spec else None)
    systems = [prompt(1000 * seed + i, rng.randint(1, 24)) for i in range(3)]
    aborted: set[str] = set()
    n_added, steps = 0, 0
    while n_added < 25 or h.sched.num_unfinished:
        if n_added < 25 and rng.random() < 0.4:
            for _ in range(rng.randint(1, 3)):
                base = rng.choice(systems + [[]])
                tail = prompt(rng.randrange(10**6), rng.randint(1, max_prompt - len(base)))
                leader = None
                n = rng.choice([1, 1, 1, 2, 3])
                for j in range(n):
                    req = h.add(f"r{n_added}.{j}", base + tail, max_tokens=rng.randint(1, max_out),
                                priority=rng.choice([0, 0, 1]), prefix_leader=leader)
                    leader = leader or req
                n_added += 1
        if h.sched.requests and rng.random() < 0.05:
            rid = rng.choice(sorted(h.sched.requests))
            h.sched.finish_request(rid, "abort")
            aborted.add(rid)
        h.step()
        steps += 1
        assert steps < 5000
    h.assert_no_leak()
    for rid, r in h.reqs.items():
        assert r.is_finished
        if rid not in aborted:
            assert r.output_token_ids == expected_output(r), rid


def test_same_prompt_requests_added_together_share_their_prefix():
    """Requests sharing a 3-block prefix, added in one burst: one computes it, the others
    wait (an unrelated request is not blocked), then share its blocks; the decode steps
    report one level with every member."""
    h = Harness(num_blocks=64, block_size=16, max_num_seqs=8, max_num_batched_tokens=40)
    shared = prompt(50, 48)
    reqs = [h.add(f"s{i}", shared + [200 + i, 300 + i], max_tokens=4) for i in range(3)]
    other = h.add("other", prompt(90, 20), max_tokens=4)
    out = h.step()
    assert [(e.request_id, e.num_tokens) for e in out.scheduled] == [("s0", 40)]
    out = h.step()  # s0 finishes its prompt; s1, s2 still wait for block 2; "other" is admitted
    assert [e.request_id for e in out.scheduled] == ["s0", "other"]
    out = h.step()
    assert {e.request_id: e.start for e in out.scheduled if e.request_id in ("s1", "s2")} == {"s1": 48, "s2": 48}
    out = h.step()
    groups = [(g.first_block, g.num_blocks, {out.scheduled[r].request_id for r in g.rows})
              for g in out.prefix_groups]
    assert groups == [(0, 3, {"s0", "s1", "s2"})]
    h.run()
    for r in reqs + [other]:
        assert r.output_token_ids == expected_output(r)
