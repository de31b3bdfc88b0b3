"""Speculative decoding on the real SmolLM2: lossless against the plain path.

Greedy outputs (with logprobs and a stop string) are token-for-token those of
speculation off, at batch 1 and in a mixed batch under preemption with prefix
hits; seeded sampling gives the same tokens for k = 0, 2, 8; every KV block
comes back, aborts mid-speculation included.
"""
from __future__ import annotations

import pytest
import torch

from engine.sampling_params import SamplingParams

SYSTEM = "You are a careful assistant. Answer in full sentences and repeat key facts. "
PROMPTS = [
    "Repeat exactly: the red fox runs. the red fox runs. the red fox runs. the red",
    "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\ndef mul(a, b):\n",
    SYSTEM + "List the planets: Mercury, Venus, Earth, Mars,",
    SYSTEM + "Count: 1, 2, 3, 4, 5, 6, 7,",
    "Once upon a time",
    SYSTEM + "What is the capital of France?",
    "A B C D E F G A B C D E F G A B C",
    "The weather today is",
]
NEW = 32


def greedy(**kw) -> SamplingParams:
    return SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True, **kw)


def mixed_params() -> list[SamplingParams]:
    ps = [greedy() for _ in PROMPTS]
    ps[2] = greedy(logprobs=2)
    ps[3] = greedy(stop=["9,"])  # a stop string inside an accepted run
    return ps


def run(llm, prompts, params):
    outs = llm.generate(prompts, params)
    assert llm.core.scheduler.kv.num_free_blocks == len(llm.core.scheduler.kv.pool.blocks)
    return outs


def assert_same_or_near_tie(hf_smol, llm, prompt: str, ref, got) -> None:
    """Token-identical, unless the first difference is a near-tie of the top-2 logits."""
    a, b = list(ref.token_ids), list(got.token_ids)
    if a == b:
        return
    j = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y) if a[:len(b)] != b[:len(a)] else min(len(a), len(b))
    ids = llm.tokenizer.encode(prompt) + a[:j]
    with torch.no_grad():
        logits = hf_smol(torch.tensor([ids])).logits[0, -1]
    top2 = logits.topk(2).values
    assert float(top2[0] - top2[1]) < 1e-4, f"{prompt!r}: differs at {j} without a near-tie"


@pytest.fixture(scope="module")
def plain(smol_loaded):
    from engine.llm import LLM

    llm = LLM(loaded=smol_loaded, num_kv_blocks=16)
    return llm, run(llm, PROMPTS, mixed_params())


def use_synthetic_latency(llm) -> None:
    """A synthetic latency model under which good drafts pay: the controller's choices, not
    this machine's timings (noisy, and at batch 1 a GEMV jump), decide what is drafted."""
    from engine.spec import LatencyModel
    from engine.spec.latency import ContextCost
    fixed = LatencyModel(0.05, 0.0005)
    fixed.observe = lambda *args, **kwargs: None  # no online refinement: deterministic choices
    llm.core.spec.controller.latency = fixed
    llm.core.spec.controller.context = ContextCost()


@pytest.mark.parametrize("method, adaptive", [("ngram", False), ("ngram", True), ("recycling", False)])
def test_greedy_mixed_batch_with_preemption_and_prefix_hits(make_llm, hf_smol, plain, method, adaptive):
    base_llm, ref = plain
    llm = make_llm(num_kv_blocks=16, speculative_method=method, num_speculative_tokens=8,
                   speculative_adaptive=adaptive)
    if adaptive:
        use_synthetic_latency(llm)
    if method == "recycling":  # learn the adjacency first (it is shared across requests)
        run(llm, PROMPTS[4:], [greedy()] * 4)
    else:  # cache one prompt's blocks, so it hits them when the batch admits it (the hits
        # preemption gives, a preempted request's own blocks still cached, depend on timing)
        run(llm, [PROMPTS[2]], [SamplingParams(max_tokens=2, temperature=0.0)])
    before = llm.core.spec.totals.num_accepted_tokens
    outs = run(llm, PROMPTS, mixed_params())
    stats = llm.core.spec.totals
    assert stats.num_accepted_tokens - before > 20, stats  # drafts were really verified and kept
    assert llm.core.scheduler.num_preemptions > 0
    assert llm.core.scheduler.kv.hit_tokens > 0
    for prompt, r, o in zip(PROMPTS, ref, outs):
        assert_same_or_near_tie(hf_smol, base_llm, prompt, r.outputs[0], o.outputs[0])
        assert r.outputs[0].finish_reason == o.outputs[0].finish_reason
    assert outs[3].outputs[0].finish_reason == "stop" and outs[3].outputs[0].text == ref[3].outputs[0].text
    lp_ref, lp = ref[2].outputs[0].logprobs, outs[2].outputs[0].logprobs
    assert len(lp) == len(lp_ref) == NEW
    for d_ref, d in zip(lp_ref, lp):
        assert d.keys() == d_ref.keys()
        for tok in d:
            assert abs(d[tok].logprob - d_ref[tok].logprob) < 1e-3


def test_greedy_batch_1(make_llm, hf_smol, plain):
    base_llm, ref = plain
    llm = make_llm(speculative_method="ngram", num_speculative_tokens=8)
    # The real model's rows read their own KV: the start-up probes priced each context token.
    assert llm.core.spec.controller.context.per_token > 0
    use_synthetic_latency(llm)
    for i in (0, 1, 6):
        out = run(llm, [PROMPTS[i]], [greedy()])[0]
        assert_same_or_near_tie(hf_smol, base_llm, PROMPTS[i], ref[i].outputs[0], out.outputs[0])
    assert llm.core.spec.totals.num_accepted_tokens > 10


def test_seeded_sampling_same_for_every_k(make_llm):
    params = [SamplingParams(max_tokens=24, temperature=0.8, top_p=0.95, seed=7 + i, ignore_eos=True,
                             presence_penalty=0.3 * (i == 1)) for i in range(3)]
    prompts = [PROMPTS[0], PROMPTS[6], PROMPTS[4]]
    results = []
    for method, k in (("", 0), ("ngram", 2), ("ngram", 8), ("recycling", 8)):
        extra = {} if k == 0 else dict(speculative_method=method, num_speculative_tokens=k,
                                       speculative_adaptive=False)
        llm = make_llm(**extra)
        if method == "recycling":  # trees need a learned adjacency
            run(llm, prompts, params)
            before = llm.core.spec.totals.num_accepted_tokens
        results.append([o.outputs[0].token_ids for o in run(llm, prompts, params)])
        if k:
            assert llm.core.spec.totals.num_draft_tokens > 0
        if method == "recycling":
            assert llm.core.spec.totals.num_accepted_tokens > before
    assert results[0] == results[1] == results[2] == results[3]


def test_abort_mid_speculation_frees_blocks(make_llm):
    llm = make_llm(speculative_method="ngram", num_speculative_tokens=8, speculative_adaptive=False)
    core = llm.core
    for i, prompt in enumerate(PROMPTS[:4]):
        core.add_request(f"r{i}", prompt, SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True))
    drafted = False
    for _ in range(12):
        core.step()
        drafted |= any(r.draft_token_ids for r in core.scheduler.running)
        if drafted:
            break
    assert drafted
    core.abort("r0")
    core.abort("r2")
    while core.scheduler.num_unfinished:
        core.step()
    core.step()
    kv = core.scheduler.kv
    assert kv.num_free_blocks == len(kv.pool.blocks) and kv.req_blocks == {}
    assert core.spec.drafter._state == {}


def test_the_decoder_sees_the_rows_about_to_join_the_batch(make_llm, monkeypatch):
    """Each step the decoder is given the waiting requests the schedule admits next (as many
    as seats are free) and the running ones still in prefill: the rows a draft model's
    catch-up is priced against. With 2 seats and 5 requests of staggered lengths, a request
    is admitted while another decodes, and every admitted one runs in the next step. (ngram
    with joining rows priced, as a model drafter has them, without loading a second model;
    ngram itself is given none: it has no catch-up to price.)"""
    from engine.spec.decoder import SpeculativeDecoder

    llm = make_llm(speculative_method="ngram", num_speculative_tokens=4, max_num_seqs=2)
    assert not llm.core.spec.prices_joining
    monkeypatch.setattr(SpeculativeDecoder, "prices_joining", property(lambda self: True))
    core, seen = llm.core, []
    propose = core.spec.propose

    def spy(running, admitted=()):
        seen.append(([r.request_id for r in running], [r.request_id for r in admitted],
                     [r.request_id for r in core.scheduler.waiting]))
        propose(running, admitted)
    core.spec.propose = spy
    for i, prompt in enumerate(PROMPTS[:5]):
        core.add_request(f"r{i}", prompt, SamplingParams(max_tokens=2 + 3 * i, temperature=0.0, ignore_eos=True))
    while core.scheduler.num_unfinished:
        core.step()
    assert seen[0][1] == ["r0", "r1"]
    for (running, admitted, waiting), (next_running, _, _) in zip(seen, seen[1:]):
        assert admitted == waiting[:2 - len(running)]
        assert set(admitted) <= set(next_running)
    assert any(running and admitted for running, admitted, _ in seen)
