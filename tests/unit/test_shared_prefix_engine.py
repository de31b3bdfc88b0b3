"""Shared-prefix attention end to end on the real model: outputs identical with it on and
off (16 requests over a >= 1,024-token system prompt, n = 8 seeded samples, a nested
forest), the decomposition really ran, and n = 8 siblings hold one copy of the prompt."""
from __future__ import annotations

import math

import pytest

from engine.sampling_params import SamplingParams

SYSTEM = ("You are a careful assistant for a public library. Answer questions about opening "
          "hours, membership, borrowing rules, events and the catalogue. ") * 40
QUESTIONS = [f"Question {i}: what should a reader who wants item number {i * 37} do first? "
             for i in range(16)]
DOCS = ["The east wing holds maps, atlases and old newspapers, on microfilm since 1990. " * 12,
        "The children's room runs story hours on Tuesdays and a reading club on Fridays. " * 12]


def _record_cascades(llm) -> list:
    """Each step's decomposition plan of the engine's attention backend."""
    attn, plans = llm.core.runner.attn, []
    plan = attn.plan

    def recording(layout):
        plan(layout)
        plans.append(attn.cascade)
    attn.plan = recording
    return plans


def _texts(outputs):
    return [[c.token_ids for c in o.outputs] for o in outputs]


def _no_leak(llm):
    kv = llm.core.scheduler.kv
    kv.pool.check_invariants()
    assert all(b.ref_count == 0 for b in kv.pool.blocks) and not kv.req_blocks and not kv.pending


def test_sixteen_requests_over_a_long_system_prompt_match_plain_attention(make_llm):
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    runs = {}
    for mode in ("off", "on"):
        llm = make_llm(shared_prefix_attention=mode, num_kv_blocks=512, max_num_seqs=16)
        prompts = [SYSTEM + q for q in QUESTIONS]
        assert len(llm.tokenizer.encode(SYSTEM)) >= 1024
        plans = _record_cascades(llm)
        runs[mode] = _texts(llm.generate(prompts, greedy))
        _no_leak(llm)
        if mode == "on":
            block = llm.core.scheduler.kv.block_size
            shared_blocks = len(llm.tokenizer.encode(SYSTEM)) // block
            widest = max((lv for p in plans for lv in p.levels), key=lambda lv: len(lv.rows))
            assert len(widest.rows) == 16 and widest.num_pages >= shared_blocks - 1
            assert sum(1 for p in plans if p.active) >= 20  # every decode step of the batch
        else:
            assert not any(p.active for p in plans)
    assert runs["on"] == runs["off"]


def test_n8_seeded_samples_match_and_share_the_prompt_blocks(make_llm):
    params = SamplingParams(n=8, temperature=0.9, top_p=0.95, seed=1234, max_tokens=20, ignore_eos=True)
    prompt = SYSTEM[:2500] + QUESTIONS[3]
    runs = {}
    for mode in ("off", "on"):
        llm = make_llm(shared_prefix_attention=mode, num_kv_blocks=512)
        plans = _record_cascades(llm)
        kv = llm.core.scheduler.kv
        peak = 0
        llm.core.add_request("n8", prompt, params)
        outputs = []
        while llm.core.has_unfinished():
            outputs += llm.core.step()[0]
            peak = max(peak, sum(1 for b in kv.pool.blocks if b.ref_count > 0))
        final = [o for o in outputs if o.finished]
        runs[mode] = _texts(final)
        bs, prompt_len = kv.block_size, len(llm.tokenizer.encode(prompt))
        assert peak <= math.ceil(prompt_len / bs) + 8 * math.ceil((params.max_tokens + 1) / bs) + 8
        if mode == "on":
            assert any(len(lv.rows) == 8 for p in plans for lv in p.levels)
        _no_leak(llm)
    assert runs["on"] == runs["off"] and len(runs["on"][0]) == 8


def test_nested_forest_matches_plain_attention(make_llm):
    """A system prompt shared by six requests, each of two documents by three of them."""
    prompts = [SYSTEM[:1800] + DOCS[i % 2] + QUESTIONS[i] for i in range(6)]
    greedy = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    runs = {}
    for mode in ("off", "on"):
        llm = make_llm(shared_prefix_attention=mode, num_kv_blocks=512)
        plans = _record_cascades(llm)
        runs[mode] = _texts(llm.generate(prompts, greedy))
        if mode == "on":
            widths = {len(lv.rows) for p in plans for lv in p.levels}
            assert {6, 3} <= widths, widths  # the root level and each document's level
        _no_leak(llm)
    assert runs["on"] == runs["off"]


@pytest.mark.parametrize("bad", ["sometimes", ""])
def test_unknown_mode_is_refused(make_llm, bad):
    with pytest.raises(ValueError, match="shared_prefix_attention"):
        make_llm(shared_prefix_attention=bad)
