"""Validation at the edge: SamplingParams (model-free) and EngineCore.validate (ids, lengths).

Boundaries are tested both ways: the last accepted value and the first refused
one, and every refusal names its `param`. The engine-level checks are driven
through the offline `LLM` (the same validator AsyncEngine uses), and a refused
request must leave the engine serving.
"""
from __future__ import annotations

import math

import pytest

from engine.errors import ContextLengthError
from engine.sampling_params import (INT64_MAX, MAX_CACHE_SALT_CHARS, MAX_ID_LIST, MAX_LOGIT_BIAS,
                                    MAX_LOGPROBS, MAX_N, MAX_STOP_STRINGS, MAX_TOKENS_LIMIT,
                                    ParamError, SamplingParams)

# (field, last accepted, first refused)
BOUNDARIES = [
    ("n", MAX_N, MAX_N + 1),
    ("n", 1, 0),
    ("temperature", 0.0, -1e-9),
    ("top_p", 1.0, 1.0000001),
    ("top_p", 1e-9, 0.0),
    ("min_p", 1.0, 1.0000001),
    ("presence_penalty", 2.0, 2.0000001),
    ("frequency_penalty", -2.0, -2.0000001),
    ("repetition_penalty", 1e-9, 0.0),
    ("max_tokens", MAX_TOKENS_LIMIT, MAX_TOKENS_LIMIT + 1),
    ("max_tokens", 1, 0),
    ("logprobs", MAX_LOGPROBS, MAX_LOGPROBS + 1),
    ("logprobs", 0, -1),
    ("seed", INT64_MAX - 1, INT64_MAX),  # n = 1: seed + 0 .. seed + n - 1 must fit
    ("seed", -(2 ** 63), -(2 ** 63) - 1),
    ("top_k", -1, -2),
    ("stop_token_ids", [INT64_MAX], [INT64_MAX + 1]),
    ("stop_token_ids", [0] * MAX_ID_LIST, [0] * (MAX_ID_LIST + 1)),
    ("stop", ["x"] * MAX_STOP_STRINGS, ["x"] * (MAX_STOP_STRINGS + 1)),
    ("logit_bias", {5: 100.0}, {5: 100.5}),
    ("logit_bias", {i: 1.0 for i in range(MAX_LOGIT_BIAS)}, {i: 1.0 for i in range(MAX_LOGIT_BIAS + 1)}),
    ("cache_salt", "s" * MAX_CACHE_SALT_CHARS, "s" * (MAX_CACHE_SALT_CHARS + 1)),
]


@pytest.mark.parametrize("name,ok,bad", BOUNDARIES, ids=[f"{b[0]}-{i}" for i, b in enumerate(BOUNDARIES)])
def test_boundary_accepted_then_refused(name, ok, bad):
    SamplingParams(**{name: ok})
    with pytest.raises(ParamError) as err:
        SamplingParams(**{name: bad})
    assert err.value.param == name


@pytest.mark.parametrize("name", ["temperature", "top_p", "min_p", "presence_penalty",
                                  "frequency_penalty", "repetition_penalty"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, "0.5", True])
def test_non_finite_or_non_numbers_refused(name, value):
    with pytest.raises(ParamError) as err:
        SamplingParams(**{name: value})
    assert err.value.param == name


@pytest.mark.parametrize("name,value", [("n", True), ("max_tokens", 2.0), ("seed", "1"),
                                        ("logprobs", 1.5), ("stop_token_ids", [True]),
                                        ("logit_bias", {"5": 1.0}), ("logit_bias", {5: math.nan})])
def test_wrong_types_refused(name, value):
    with pytest.raises(ParamError) as err:
        SamplingParams(**{name: value})
    assert err.value.param == name


@pytest.mark.parametrize("name,value", [("stop", ["a\ud800b"]), ("stop", ["a\x00"]), ("stop", [""]),
                                        ("cache_salt", "\udfff"), ("cache_salt", "")])
def test_unencodable_strings_refused(name, value):
    with pytest.raises(ParamError) as err:
        SamplingParams(**{name: value})
    assert err.value.param == name


def test_seed_range_depends_on_n():
    SamplingParams(seed=INT64_MAX - 4, n=4)  # seeds up to INT64_MAX - 1
    with pytest.raises(ParamError):
        SamplingParams(seed=INT64_MAX - 4, n=5)


@pytest.fixture(scope="module")
def llm(smol_loaded):
    from engine.llm import LLM
    return LLM(loaded=smol_loaded, max_model_len=64, num_kv_blocks=32)


def test_engine_validator_ids_against_vocab(llm):
    vocab = llm.core.vocab_size
    ok = SamplingParams(max_tokens=2, temperature=0)
    cases = [("stop_token_ids", dict(stop_token_ids=[vocab - 1]), dict(stop_token_ids=[vocab])),
             ("logit_bias", dict(logit_bias={vocab - 1: 1.0}), dict(logit_bias={vocab: 1.0}))]
    for param, good, bad in cases:
        assert llm.generate([1, 2, 3], SamplingParams(max_tokens=2, temperature=0, **good))[0].finished
        with pytest.raises(ParamError) as err:
            llm.generate([1, 2, 3], SamplingParams(max_tokens=2, temperature=0, **bad))
        assert err.value.param == param
    llm.generate([vocab - 1], ok)
    for prompt in ([vocab], [-1], [1, 2**63], [1, True]):
        with pytest.raises(ParamError) as err:
            llm.generate(prompt, ok)
        assert err.value.param == "prompt"
    with pytest.raises(ParamError) as err:
        llm.generate([[]], ok)
    assert err.value.param == "prompt"
    with pytest.raises(ParamError) as err:
        llm.generate("hello \ud800", ok)
    assert err.value.param == "prompt"
    # The request: an id past int64. Refused before any tensor sees it.
    with pytest.raises(ParamError) as err:
        SamplingParams(max_tokens=4, min_tokens=1, stop_token_ids=[9223372036854775808])
    assert err.value.param == "stop_token_ids"
    assert not llm.core.has_unfinished() and llm.core.scheduler.kv.usage() == 0


def test_engine_validator_lengths(llm):
    prompt = list(range(1, 61))  # 60 tokens, max_model_len 64
    assert len(llm.generate(prompt, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))[0]
               .outputs[0].token_ids) == 4
    with pytest.raises(ContextLengthError) as err:
        llm.generate(prompt, SamplingParams(max_tokens=5))
    assert err.value.param == "max_tokens"
    with pytest.raises(ContextLengthError) as err:
        llm.generate(list(range(1, 65)), SamplingParams(max_tokens=1))
    assert err.value.param == "prompt"


def test_bad_prompt_in_a_batch_leaves_nothing_queued(llm):
    with pytest.raises(ParamError):
        llm.generate([[1, 2, 3], [llm.core.vocab_size]], SamplingParams(max_tokens=2))
    assert not llm.core.has_unfinished()
    assert llm.core.scheduler.num_unfinished == 0 and llm.core.scheduler.kv.usage() == 0
    out = llm.generate([1, 2, 3], SamplingParams(max_tokens=2, temperature=0))
    assert out[0].outputs[0].finish_reason == "length"
