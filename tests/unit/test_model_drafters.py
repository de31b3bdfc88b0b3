"""Model drafters (layerskip, draft) on the real SmolLM2: lossless against the plain path.

The target as its own draft accepts (nearly) every greedy draft, through
preemption and prefix hits, on its own KV and on the target's; a tiny random
draft model with the same tokenizer is lossless for greedy and seeded sampling;
layerskip is lossless; every KV block comes back and the draft model's
per-request state is dropped.
"""
from __future__ import annotations

import pytest

from engine.sampling_params import SamplingParams
from engine.spec.model_drafter import kept_layers
from tests.unit.test_spec_engine import PROMPTS, assert_same_or_near_tie, run

NEW = 16
BATCH = PROMPTS[:6] + [PROMPTS[1]]  # the repeated prompt hits the prefix cache


@pytest.fixture(scope="module")
def plain_greedy(smol_loaded):
    from engine.llm import LLM

    llm = LLM(loaded=smol_loaded, num_kv_blocks=16)
    return llm, run(llm, BATCH, params())


@pytest.fixture(scope="module")
def tiny_draft(tmp_path_factory):
    from engine.config import EngineArgs
    from engine.setup import load_model
    from tests.e2e.tiny_model import build_tiny_model

    path = build_tiny_model(tmp_path_factory.mktemp("tiny") / "llama")
    return load_model(EngineArgs(model=str(path), max_model_len=8192))


def params(n: int = len(BATCH)) -> list[SamplingParams]:
    return [SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True)] * n


def test_kept_layers_spread_and_bounds():
    assert kept_layers(30, 0.5) == sorted(set(kept_layers(30, 0.5)))
    assert len(kept_layers(30, 0.5)) == 15 and kept_layers(30, 0.5)[0] == 0 and kept_layers(30, 0.5)[-1] == 29
    assert kept_layers(4, 1.0) == [0, 1, 2, 3] and kept_layers(4, 0.01) == [0, 3]


def test_target_as_its_own_draft_accepts_greedy_drafts(make_llm, smol_loaded, hf_smol, plain_greedy):
    base, ref = plain_greedy
    llm = make_llm(num_kv_blocks=16, speculative_method="draft", num_speculative_tokens=4,
                   speculative_adaptive=False, draft_loaded=smol_loaded, speculative_draft_kv="own")
    run(llm, [PROMPTS[1]], params(1))  # leaves its prompt blocks in the prefix cache
    preempted = _watch_preemptions(llm)
    outs = run(llm, BATCH, params())
    # A preempted request's draft KV went with its blocks: while it waits, its catch-up is
    # priced from 0 (its whole context), not from the mark its draft had reached.
    assert preempted and all(backlog == tokens for backlog, tokens in preempted), preempted
    stats = llm.core.spec.totals
    assert stats.num_draft_tokens > 40
    # Same weights: a draft differs from the target only on a numerical near-tie.
    assert stats.num_accepted_tokens >= 0.95 * stats.num_draft_tokens, stats
    assert llm.core.scheduler.num_preemptions > 0 and llm.core.scheduler.kv.hit_tokens > 0
    for prompt, r, o in zip(BATCH, ref, outs):
        assert_same_or_near_tie(hf_smol, base, prompt, r.outputs[0], o.outputs[0])
    assert llm.core.runner.model_drafter._computed == {}


def test_target_as_its_own_draft_on_the_shared_kv_never_catches_up(make_llm, smol_loaded, hf_smol,
                                                                    plain_greedy):
    """speculative_draft_kv "auto" puts the target's own checkpoint on the target's KV: the
    draft passes attend over the target's KV of the committed tokens, so pass 0 feeds one
    token a request (no prompt catch-up), through preemption and prefix hits; drafts are
    accepted as with its own KV, and the output is the plain path's."""
    base, ref = plain_greedy
    llm = make_llm(num_kv_blocks=16, speculative_method="draft", num_speculative_tokens=4,
                   speculative_adaptive=False, draft_loaded=smol_loaded)
    drafter = llm.core.runner.model_drafter
    assert drafter.shared_kv and drafter.kv_memory is None and drafter.kv_caches is llm.core.runner.kv_caches
    passes = []
    draft = drafter.draft

    def watched(sched):
        out = draft(sched)
        passes.extend(out[1])
        return out
    drafter.draft = watched
    run(llm, [PROMPTS[1]], params(1))  # leaves its prompt blocks in the prefix cache
    outs = run(llm, BATCH, params())
    stats = llm.core.spec.totals
    assert stats.num_draft_tokens > 40 and stats.num_accepted_tokens >= 0.95 * stats.num_draft_tokens, stats
    assert llm.core.scheduler.num_preemptions > 0 and llm.core.scheduler.kv.hit_tokens > 0
    assert passes and all(p.num_tokens == p.rows for p in passes)  # one token a row: no catch-up
    for prompt, r, o in zip(BATCH, ref, outs):
        assert_same_or_near_tie(hf_smol, base, prompt, r.outputs[0], o.outputs[0])
    assert llm.core.scheduler.kv.num_free_blocks == llm.core.scheduler.kv.pool.num_blocks


def test_draft_kv_modes_split_the_kv_budget_only_for_a_draft_of_its_own(make_llm, smol_loaded, tiny_draft):
    """The KV budget holds the target's KV and, unless shared, the draft's; "shared" needs
    the target's KV shape (the tiny draft has other layers and heads); "auto" shares for
    the target's own checkpoint only."""
    from engine.errors import UnsupportedModelError

    def blocks(**kwargs):
        llm = make_llm(kv_cache_memory=64 << 20, speculative_method="draft", num_speculative_tokens=2,
                       speculative_adaptive=False, **kwargs)
        return llm.core.runner.cfg.cache.num_blocks, llm.core.runner.model_drafter.shared_kv
    shared, own = blocks(draft_loaded=smol_loaded), blocks(draft_loaded=smol_loaded, speculative_draft_kv="own")
    assert shared[1] and not own[1] and own[0] == shared[0] // 2  # same shape: half the blocks
    assert blocks(draft_loaded=tiny_draft)[1] is False
    with pytest.raises(UnsupportedModelError, match="KV shape"):
        blocks(draft_loaded=tiny_draft, speculative_draft_kv="shared")
    with pytest.raises(ValueError, match="speculative_draft_kv"):
        blocks(draft_loaded=smol_loaded, speculative_draft_kv="both")


def _watch_preemptions(llm) -> list[tuple[int, int]]:
    """(draft backlog, tokens) of each request right after the step that preempted it."""
    seen: list[tuple[int, int]] = []
    counts: dict[str, int] = {}
    step = llm.core.step

    def watched():
        result = step()
        for rid, req in llm.core.scheduler.requests.items():
            if req.num_preemptions > counts.get(rid, 0):
                seen.append((llm.core.runner.model_drafter.backlog(rid, req.num_tokens), req.num_tokens))
            counts[rid] = req.num_preemptions
        return result
    llm.core.step = watched
    return seen


def test_tiny_random_draft_model_is_lossless(make_llm, hf_smol, plain_greedy, tiny_draft):
    base, ref = plain_greedy
    llm = make_llm(num_kv_blocks=16, speculative_method="draft", num_speculative_tokens=3,
                   speculative_adaptive=False, draft_loaded=tiny_draft)
    outs = run(llm, BATCH, params())
    assert llm.core.spec.totals.num_draft_tokens > 40
    for prompt, r, o in zip(BATCH, ref, outs):
        assert_same_or_near_tie(hf_smol, base, prompt, r.outputs[0], o.outputs[0])


def test_seeded_sampling_same_with_model_drafters(make_llm, smol_loaded, tiny_draft):
    sp = [SamplingParams(max_tokens=16, temperature=0.8, top_p=0.95, seed=3 + i, ignore_eos=True) for i in range(3)]
    prompts = [PROMPTS[0], PROMPTS[6], PROMPTS[4]]
    ref = [o.outputs[0].token_ids for o in run(make_llm(), prompts, sp)]
    for extra in (dict(speculative_method="draft", draft_loaded=tiny_draft),
                  dict(speculative_method="layerskip", speculative_layerskip_keep=0.7)):
        llm = make_llm(num_speculative_tokens=3, speculative_adaptive=False, **extra)
        assert [o.outputs[0].token_ids for o in run(llm, prompts, sp)] == ref, extra["speculative_method"]
        assert llm.core.spec.totals.num_draft_tokens > 0


def test_layerskip_greedy_is_lossless(make_llm, hf_smol, plain_greedy):
    base, ref = plain_greedy
    llm = make_llm(num_kv_blocks=16, speculative_method="layerskip", num_speculative_tokens=2,
                   speculative_adaptive=False, speculative_layerskip_keep=0.8)
    outs = run(llm, BATCH, params())
    assert llm.core.spec.totals.num_draft_tokens > 40
    for prompt, r, o in zip(BATCH, ref, outs):
        assert_same_or_near_tie(hf_smol, base, prompt, r.outputs[0], o.outputs[0])


def test_draft_method_needs_a_model(smol_loaded):
    from engine.errors import UnsupportedModelError
    from engine.llm import LLM

    with pytest.raises(UnsupportedModelError, match="speculative-model"):
        LLM(loaded=smol_loaded, speculative_method="draft")


def test_q8_self_draft_loads_in_q8_and_is_lossless(make_llm, smol_loaded, hf_smol, plain_greedy):
    """speculative_draft_activation_quant="q8": the draft is the target's own GGUF on the q8
    kernels while the target stays fp32 activations; greedy output is the plain path's and
    the close draft is accepted most of the time."""
    from kernels import gguf_cpu

    if not gguf_cpu.available():
        pytest.skip("native CPU kernels not built")
    base, ref = plain_greedy
    llm = make_llm(num_kv_blocks=16, speculative_method="draft", speculative_model="smollm2-135m",
                   speculative_draft_activation_quant="q8", num_speculative_tokens=4,
                   speculative_adaptive=False)
    draft_model = llm.core.runner.model_drafter.model
    assert llm.core.runner.model_drafter.shared_kv  # "auto": the target's own GGUF, by name

    def q8_flags(model):
        return {m.q8 for m in model.modules() if hasattr(m, "q8_capable") and m.q8_capable}
    assert q8_flags(draft_model) == {True} and q8_flags(llm.core.runner.model) == {False}
    # Loaded once by the caller from the target's file (as loadtest/spec_bench.py does for its
    # engines), the draft is still the target's own checkpoint: "auto" shares its KV.
    from engine.config import EngineArgs
    from engine.setup import load_draft_model
    q8_args = dict(speculative_method="draft", speculative_model="smollm2-135m",
                   speculative_draft_activation_quant="q8")
    draft = load_draft_model(EngineArgs(**q8_args), smol_loaded)
    assert draft.model is not draft_model and q8_flags(draft.model) == {True}

    # The q8 draft runs the native attention under "auto" even where the target runs
    # torch's (the fp32 path, cpu_native_kernels=False); a backend named by the user holds.
    def backends(**kwargs):
        engine = make_llm(num_kv_blocks=16, draft_loaded=draft, **q8_args, **kwargs).core.runner
        assert engine.model_drafter.shared_kv and engine.model_drafter.model is draft.model
        return engine.attn.name, engine.model_drafter.attn.name
    assert backends(cpu_native_kernels=False) == ("torch", "cpu")
    assert backends(attention_backend="torch") == ("torch", "torch")
    outs = run(llm, BATCH, params())
    stats = llm.core.spec.totals
    assert stats.num_draft_tokens > 40 and stats.num_accepted_tokens >= 0.7 * stats.num_draft_tokens, stats
    for prompt, r, o in zip(BATCH, ref, outs):
        assert_same_or_near_tie(hf_smol, base, prompt, r.outputs[0], o.outputs[0])


def test_draft_activation_quant_is_checked():
    from engine.config import EngineArgs

    EngineArgs(speculative_method="draft", speculative_draft_activation_quant="q8").resolved_speculative()
    with pytest.raises(ValueError, match="speculative_draft_activation_quant"):
        EngineArgs(speculative_method="draft", speculative_draft_activation_quant="q4").resolved_speculative()
