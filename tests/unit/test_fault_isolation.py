"""Fault isolation: a fault for one request finishes that request with an error; the
engine and every other request go on with outputs identical to a fault-free run.

Faults are injected for one request id at each stage the guard handles: an
unattributed exception in the model step (found by bisecting the batch), a
sampling-metadata fault (attributed by the stage), and a detokenizer fault.
The survivors mix greedy and seeded-sampling requests, so the test also shows
that the guard restores the seeded generators before it re-runs the step.
"""
from __future__ import annotations

import pytest

from engine.sample import metadata
from engine.sampling_params import SamplingParams

PROMPTS = {
    "greedy-a": ("The capital of France is", SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)),
    "seeded-b": ("Once upon a time", SamplingParams(temperature=0.9, seed=7, max_tokens=10, ignore_eos=True)),
    "seeded-c": ("def fibonacci(n):", SamplingParams(temperature=0.7, seed=11, n=2, max_tokens=10,
                                                     ignore_eos=True)),
    "greedy-d": ("1, 2, 3, 4,", SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)),
}
BAD = ("The weather today", SamplingParams(temperature=0.8, seed=3, n=2, max_tokens=10, ignore_eos=True))


def _run(core, requests):
    """Add the requests (one at a time, like arrivals), step to the end; finals and finish reasons."""
    finals, reasons = {}, []
    for rid, (prompt, params) in requests.items():
        core.add_request(rid, prompt, params)
        outs, stats = core.step()
        finals.update({o.request_id: o for o in outs if o.finished})
        reasons += [f.finish_reason for f in stats.finished]
    while core.has_unfinished():
        outs, stats = core.step()
        finals.update({o.request_id: o for o in outs if o.finished})
        reasons += [f.finish_reason for f in stats.finished]
    return finals, reasons


def _tokens(finals, ids):
    return {rid: [c.token_ids for c in finals[rid].outputs] for rid in ids}


@pytest.fixture(scope="module")
def reference(smol_loaded):
    from engine.llm import LLM
    llm = LLM(loaded=smol_loaded, num_kv_blocks=128)
    finals, _ = _run(llm.core, PROMPTS)
    return _tokens(finals, PROMPTS)


@pytest.fixture
def llm(make_llm):
    return make_llm(num_kv_blocks=128)


def _assert_isolated(llm, finals, reasons, reference):
    bad = finals["bad"]
    assert bad.finished and bad.error
    assert [c.finish_reason for c in bad.outputs] == ["error", "error"]  # n > 1 fails as a whole
    assert reasons.count("error") == 2
    assert _tokens(finals, PROMPTS) == reference
    assert all(c.finish_reason == "length" for rid in PROMPTS for c in finals[rid].outputs)
    core = llm.core
    assert not core.groups and not core.seq_to_group
    assert core.scheduler.num_unfinished == 0 and core.scheduler.kv.usage() == 0
    # The engine still serves.
    again = llm.generate("The capital of France is", PROMPTS["greedy-a"][1])[0]
    assert again.outputs[0].token_ids == reference["greedy-a"][0]


def test_unattributed_step_fault_is_bisected(llm, reference):
    runner = llm.core.runner
    prepare = runner._prepare
    calls = {"faulty": 0}

    def faulty_prepare(sched):
        batch = prepare(sched)
        # Fails only once the bad request is decoding (its 3rd token on), with no hint of who.
        if any(s.request_id.startswith("bad") and s.request.num_output_tokens >= 3 for s in sched.scheduled):
            calls["faulty"] += 1
            raise RuntimeError("injected fault")
        return batch
    runner._prepare = faulty_prepare
    finals, reasons = _run(llm.core, {**PROMPTS, "bad": BAD})
    assert calls["faulty"] >= 2  # the full step, then the bisection's halves
    _assert_isolated(llm, finals, reasons, reference)


def test_sampling_stage_fault_is_attributed(llm, reference, monkeypatch):
    suppressed = metadata._suppressed_ids

    def faulty(row):
        if row.request_id == "bad#1" and len(row.output_token_ids) == 4:
            raise ValueError("injected sampling fault")
        return suppressed(row)
    monkeypatch.setattr(metadata, "_suppressed_ids", faulty)
    finals, reasons = _run(llm.core, {**PROMPTS, "bad": BAD})
    _assert_isolated(llm, finals, reasons, reference)


def test_detokenizer_fault_fails_only_that_request(llm, reference):
    core = llm.core
    requests = {**PROMPTS, "bad": BAD}
    finals, reasons = {}, []
    for rid, (prompt, params) in requests.items():
        core.add_request(rid, prompt, params)
        if rid == "bad":
            detok = core.groups["bad"].detoks[1]
            append = detok.append

            def faulty_append(ids, lps=None, _append=append, _detok=detok):
                if len(_detok.token_ids) >= 5:
                    raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "injected")
                return _append(ids, lps)
            detok.append = faulty_append
    while core.has_unfinished():
        outs, stats = core.step()
        finals.update({o.request_id: o for o in outs if o.finished})
        reasons += [f.finish_reason for f in stats.finished]
    _assert_isolated(llm, finals, reasons, reference)


def test_fault_of_every_request_is_not_a_request_fault(llm):
    """A step that fails whatever it holds is a broken engine: the error propagates."""
    runner = llm.core.runner

    def broken(sched):
        raise RuntimeError("the model is broken")
    runner._prepare = broken
    llm.core.add_request("x", "hello", SamplingParams(max_tokens=2))
    llm.core.add_request("y", "world", SamplingParams(max_tokens=2))
    with pytest.raises(RuntimeError, match="broken"):
        llm.core.step()


SHARED = "Rules of the reading room: no food, no drinks, quiet voices, return books to the desk. " * 4
SHARED_PROMPTS = {
    "shared-a": (SHARED + "Question: may I eat here?", SamplingParams(temperature=0, max_tokens=8,
                                                                     ignore_eos=True)),
    "shared-b": (SHARED + "Question: where do books go?", SamplingParams(temperature=0.9, seed=5,
                                                                         max_tokens=8, ignore_eos=True)),
}


def test_fault_inside_a_shared_prefix_group_fails_only_that_request(make_llm, monkeypatch):
    """The culprit (n = 2, same prefix as the survivors) is in the step's prefix groups:
    the re-run step's groups are renumbered to the surviving rows."""
    reference_llm = make_llm(num_kv_blocks=128, shared_prefix_attention="on")
    finals, _ = _run(reference_llm.core, SHARED_PROMPTS)
    reference = _tokens(finals, SHARED_PROMPTS)

    llm = make_llm(num_kv_blocks=128, shared_prefix_attention="on")
    attn, widths = llm.core.runner.attn, []
    plan = attn.plan

    def recording(layout):
        plan(layout)
        widths.append(max((len(lv.rows) for lv in attn.cascade.levels), default=0))
    attn.plan = recording
    suppressed = metadata._suppressed_ids

    def faulty(row):
        if row.request_id.startswith("bad") and len(row.output_token_ids) == 3:
            raise ValueError("injected sampling fault")
        return suppressed(row)
    monkeypatch.setattr(metadata, "_suppressed_ids", faulty)
    bad = (SHARED + "Question: can I sing?", SamplingParams(temperature=0.8, seed=3, n=2, max_tokens=8,
                                                            ignore_eos=True))
    finals, reasons = _run(llm.core, {**SHARED_PROMPTS, "bad": bad})
    assert max(widths) == 4  # the culprit's two sequences shared the prefix level with the survivors
    assert finals["bad"].error and reasons.count("error") == 2
    assert _tokens(finals, SHARED_PROMPTS) == reference
    assert llm.core.scheduler.num_unfinished == 0 and llm.core.scheduler.kv.usage() == 0
