"""Engine-level behaviour on the real SmolLM2: prefix caching does not change
outputs and reuses shared blocks; preemption under a tiny KV pool does not
change outputs and leaks nothing; seeds are batch-independent; n > 1, stops."""
from __future__ import annotations

import pytest

from engine.sampling_params import SamplingParams

SHARED = ("You are a careful assistant. Answer briefly and precisely. The following is a conversation "
          "about geography, history and science between a student and a teacher. ") * 3
SUFFIXES = ["What is the capital of Italy?", "Who wrote Hamlet?", "Why is the sky blue?", "Name a prime."]
GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)


def _texts(outputs):
    return [o.outputs[0].token_ids for o in outputs]


def _assert_no_leak(llm):
    kv = llm.core.scheduler.kv
    kv.pool.check_invariants()
    assert all(b.ref_count == 0 for b in kv.pool.blocks)
    assert kv.num_free_blocks == kv.pool.num_blocks
    assert not llm.core.groups and not kv.req_blocks


def test_prefix_caching_same_outputs_and_reuses_blocks(make_llm):
    prompts = [SHARED + s for s in SUFFIXES]
    off = make_llm(enable_prefix_caching=False, num_kv_blocks=256).generate(prompts, GREEDY)
    on_llm = make_llm(enable_prefix_caching=True, num_kv_blocks=256)
    first = on_llm.generate(prompts[:1], GREEDY)  # warms the cache with the shared prefix
    kv = on_llm.core.scheduler.kv
    hits_before = kv.hit_tokens
    rest = on_llm.generate(prompts[1:], GREEDY)
    assert _texts(first + rest) == _texts(off)
    shared_tokens = len(on_llm.tokenizer.encode(SHARED))
    shared_blocks = shared_tokens // kv.block_size
    assert kv.hit_tokens - hits_before >= 3 * shared_blocks * kv.block_size
    assert all(o.num_cached_tokens >= shared_blocks * kv.block_size for o in rest)
    _assert_no_leak(on_llm)


def test_running_requests_share_physical_prefix_blocks(make_llm):
    llm = make_llm(num_kv_blocks=256)
    core = llm.core
    tok = llm.tokenizer
    core.add_request("lead", tok.encode(SHARED + SUFFIXES[0]), GREEDY)
    core.step()  # the leader's prompt is now cached
    for i, s in enumerate(SUFFIXES[1:]):
        core.add_request(f"f{i}", tok.encode(SHARED + s), GREEDY)
    core.step()
    kv = core.scheduler.kv
    groups = kv.shared_prefixes([r.request_id for r in core.scheduler.running])
    top = max(groups, key=lambda g: len(g.request_ids))
    assert set(top.request_ids) == {"lead", "f0", "f1", "f2"}
    assert len(top.block_ids) == len(tok.encode(SHARED)) // kv.block_size
    while core.has_unfinished():
        core.step()
    _assert_no_leak(llm)


def test_preemption_gives_identical_outputs_and_no_leak(make_llm):
    prompts = [SHARED[: 60 * (i + 1)] + s for i, s in enumerate(SUFFIXES)]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    ample = make_llm(num_kv_blocks=512).generate(prompts, params)
    tight = make_llm(num_kv_blocks=24, block_size=8, max_model_len=192)
    got = tight.generate(prompts, params)
    assert tight.core.scheduler.num_preemptions > 0
    assert _texts(got) == _texts(ample)
    _assert_no_leak(tight)


def test_abort_mid_run_frees_everything(make_llm):
    llm = make_llm(num_kv_blocks=64, block_size=8, max_model_len=256)
    core = llm.core
    for i in range(4):
        core.add_request(f"r{i}", SHARED[:200], SamplingParams(temperature=0.8, max_tokens=50, seed=i))
    for _ in range(5):
        core.step()
    core.abort("r1")
    core.abort("r3")
    while core.has_unfinished():
        core.step()
    _assert_no_leak(llm)


def test_seed_is_batch_independent(make_llm):
    llm = make_llm(num_kv_blocks=256)
    seeded = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=20, seed=1234, ignore_eos=True)
    alone = llm.generate("Once upon a time", seeded)[0].outputs[0].token_ids
    busy = llm.generate(["Tell me a joke", "Once upon a time", "1 2 3", "Once upon a time"],
                        [SamplingParams(temperature=1.0, max_tokens=20), seeded,
                         SamplingParams(temperature=0.7, top_k=5, max_tokens=20, seed=7), GREEDY])
    assert busy[1].outputs[0].token_ids == alone
    other = llm.generate("Once upon a time", SamplingParams(temperature=1.0, top_p=0.9, max_tokens=20,
                                                            seed=99, ignore_eos=True))
    assert other[0].outputs[0].token_ids != alone


def test_n_completions_share_prompt_blocks(make_llm):
    llm = make_llm(num_kv_blocks=256)
    kv = llm.core.scheduler.kv
    out = llm.generate(SHARED, SamplingParams(n=3, temperature=1.0, max_tokens=8, seed=5))[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert all(c.finish_reason == "length" and len(c.token_ids) == 8 for c in out.outputs)
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    prompt_blocks = (len(out.prompt_token_ids) - 1) // kv.block_size
    assert kv.hit_tokens >= 2 * prompt_blocks * kv.block_size  # both followers reused the prompt
    _assert_no_leak(llm)


def test_stop_string_and_stop_token(make_llm):
    llm = make_llm(num_kv_blocks=128)
    ref = llm.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=20))[0].outputs[0]
    word = ref.text.split()[0]
    stopped = llm.generate("The capital of France is",
                           SamplingParams(temperature=0, max_tokens=20, stop=[word]))[0].outputs[0]
    assert stopped.finish_reason == "stop" and stopped.stop_reason == word
    assert word not in stopped.text and ref.text.startswith(stopped.text)
    tok_stop = llm.generate("The capital of France is", SamplingParams(
        temperature=0, max_tokens=20, stop_token_ids=[ref.token_ids[2]]))[0].outputs[0]
    assert tok_stop.token_ids == ref.token_ids[:3] and tok_stop.stop_reason == ref.token_ids[2]


@pytest.mark.parametrize("kwargs", [dict(top_k=3), dict(top_p=0.5), dict(min_p=0.3)])
def test_restricted_sampling_stays_in_support(make_llm, kwargs):
    llm = make_llm(num_kv_blocks=128)
    prompt = "My favourite fruit is"
    lp = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=1, logprobs=20))[0].outputs[0].logprobs[0]
    import math
    probs = sorted(((math.exp(v.logprob), t) for t, v in lp.items()), reverse=True)
    if "top_k" in kwargs:
        allowed = {t for _, t in probs[:3]}
    elif "top_p" in kwargs:
        allowed, cum = set(), 0.0
        for p, t in probs:
            allowed.add(t)
            cum += p
            if cum >= 0.5:
                break
    else:
        allowed = {t for p, t in probs if p >= 0.3 * probs[0][0]}
    outs = llm.generate([prompt] * 24, SamplingParams(temperature=1.0, max_tokens=1, seed=None, **kwargs))
    assert {o.outputs[0].token_ids[0] for o in outs} <= allowed
