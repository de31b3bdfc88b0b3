"""Model-free tests of the llguidance grammar backend, the matcher API and the compiler
(the real SmolLM2 tokenizer, no model weights)."""
from __future__ import annotations

import glob
import json
import os
import time
from pathlib import Path

import pytest
import torch

from engine.models.loader import load_tokenizer, resolve_model
from engine.sampling_params import ParamError, SamplingParams
from engine.structured.compiler import GrammarCompiler
from engine.structured.params import StructuredOutputsParams as S

DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
SUITE = DATA / "json-schema-test-suite" / "tests" / "draft2020-12"
VOCAB = 49152
EOS = 2

# Where llguidance is deliberately stricter than JSON Schema (it never generates these
# valid instances, which is safe for generation): properties only in the schema's order,
# integers without a ".0", and "format" enforced instead of an annotation.
STRICTER = {
    ("allOf.json", "allOf", "allOf"),
    ("allOf.json", "allOf with base schema", "valid"),
    ("const.json", "const with object", "same object with different property order is valid"),
}


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(resolve_model("smollm2-135m"))


@pytest.fixture(scope="module")
def compiler(tok):
    c = GrammarCompiler(tok, VOCAB)
    yield c
    c.shutdown()


def encode(tok, text):
    return tok.encode(text, add_special_tokens=False)


def _stricter(file: str, group: str, case: str, text: str) -> bool:
    if (file, group, case) in STRICTER:
        return True
    if file == "format.json" and "annotation" in case:
        return True
    return any(part.endswith(".0") for part in text.replace("[", ",").replace("]", ",").replace(
        "}", ",").replace(":", ",").split(","))


def test_json_schema_test_suite_instances(tok, compiler):
    """Valid instances are accepted to the end, invalid ones rejected at some token."""
    files = sorted(glob.glob(str(SUITE / "*.json")))
    assert len(files) > 30, f"test suite missing under {SUITE}"
    compiled = refused = valid_ok = invalid_ok = 0
    wrongly_accepted, wrongly_rejected = [], []
    for path in files:
        name = os.path.basename(path)
        for group in json.load(open(path)):
            if isinstance(group["schema"], bool):
                continue
            try:
                # the schema's own semantics: objects not closed by us
                grammar = compiler.compile(S(json=group["schema"], allow_additional_properties=True))
            except ParamError:
                refused += 1
                continue
            compiled += 1
            for case in group["tests"]:
                text = json.dumps(case["data"], separators=(",", ":"), ensure_ascii=False)
                ids = encode(tok, text)
                m = grammar.new_matcher()
                accepted = m.validate_tokens(ids) == len(ids) and m.accept(ids) and m.is_accepting()
                key = (name, group["description"], case["description"])
                if case["valid"] and accepted:
                    valid_ok += 1
                elif not case["valid"] and not accepted:
                    invalid_ok += 1
                elif accepted:
                    wrongly_accepted.append(key)
                elif not _stricter(name, group["description"], case["description"], text):
                    wrongly_rejected.append(key)
    print(f"\nsuite: {compiled} schemas compiled, {refused} refused; valid accepted {valid_ok}, "
          f"invalid rejected {invalid_ok}")
    assert compiled >= 150 and valid_ok >= 250 and invalid_ok >= 200
    assert not wrongly_accepted, wrongly_accepted[:10]
    assert not wrongly_rejected, wrongly_rejected[:10]


def test_matcher_validate_accept_rollback(tok, compiler):
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"],
              "additionalProperties": False}
    m = compiler.compile(S(json=schema)).new_matcher()
    ids = encode(tok, '{"a":12}')
    bad = encode(tok, '{"b":1}')
    assert m.validate_tokens(ids) == len(ids)
    assert 0 < m.validate_tokens(bad) < len(bad)
    assert m.validate_tokens(ids) == len(ids)  # validate changed nothing
    assert m.accept(ids[:3]) and not m.is_accepting()
    m.rollback(3)
    assert m.validate_tokens(ids) == len(ids)  # back at the start
    assert m.accept(ids) and m.is_accepting() and m.is_terminated() and m.error() is None


def _allowed(row: torch.Tensor) -> set[int]:
    bits = ((row.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1).flatten()
    return set(torch.nonzero(bits).flatten().tolist())


def test_fill_bitmask_draft_rows_match_sequential_masks(tok, compiler):
    """Row i of a draft fill equals the mask after accepting draft[:i]; state unchanged."""
    grammar = compiler.compile(S(json={"type": "object", "properties": {"name": {"type": "string"}},
                                       "required": ["name"]}))
    m = grammar.new_matcher()
    draft = encode(tok, '{"name":"Al')
    rows = torch.empty((1 + len(draft), (VOCAB + 31) // 32), dtype=torch.int32)
    m.fill_bitmask(rows, draft)
    ref = grammar.new_matcher()
    one = torch.empty((1, rows.shape[1]), dtype=torch.int32)
    for i in range(len(draft) + 1):
        ref.fill_bitmask(one)
        assert torch.equal(one[0], rows[i]), f"row {i}"
        if i < len(draft):
            assert draft[i] in _allowed(one[0])
            ref.accept([draft[i]])
    assert m.validate_tokens(draft) == len(draft)  # m itself did not move
    # a rejected draft token: later rows are never used and must not be all-banned
    rows2 = torch.empty((3, rows.shape[1]), dtype=torch.int32)
    m.fill_bitmask(rows2, [encode(tok, "x")[0], draft[0]])
    assert (rows2[1:] == -1).all()


def test_forced_tokens_are_sole_allowed_and_leave_state(tok, compiler):
    m = compiler.compile(S(json={"type": "object", "properties": {"name": {"type": "string"}},
                                 "required": ["name"], "additionalProperties": False})).new_matcher()
    forced = m.forced_tokens(50)
    assert len(forced) >= 2 and '{"name":"'.startswith(tok.decode(forced))
    one = torch.empty((1, (VOCAB + 31) // 32), dtype=torch.int32)
    probe = m.__class__(m.m.deep_copy(), m.width, m.eos, m.executor)
    for t in forced:  # each forced token was the only one allowed at its position
        probe.fill_bitmask(one)
        assert _allowed(one[0]) == {t}
        probe.accept([t])
    assert m.validate_tokens(forced) == len(forced)  # state unchanged
    assert m.forced_tokens(2) == forced[:2]  # limit respected
    free = compiler.compile(S(regex="[a-z]+")).new_matcher()
    assert free.forced_tokens(10) == []


def test_choice_regex_and_lark(tok, compiler):
    m = compiler.compile(S(choice=["yes", "no", "a.b"])).new_matcher()
    assert m.validate_tokens(encode(tok, "a.b")) == len(encode(tok, "a.b"))
    assert m.validate_tokens(encode(tok, "axb")) < len(encode(tok, "axb"))  # "." is literal
    lark = compiler.compile(S(grammar='start: "red" | "green"')).new_matcher()
    assert lark.accept(encode(tok, "green")) and lark.is_accepting()
    regex = compiler.compile(S(regex=r"\d{3}")).new_matcher()
    assert regex.accept(encode(tok, "123")) and regex.is_terminated()


def test_eos_allowed_exactly_when_accepting(tok, compiler):
    m = compiler.compile(S(regex=r"[0-9]+")).new_matcher()
    one = torch.empty((1, (VOCAB + 31) // 32), dtype=torch.int32)
    m.fill_bitmask(one)
    assert EOS not in _allowed(one[0])
    m.accept(encode(tok, "7"))
    m.fill_bitmask(one)
    assert EOS in _allowed(one[0])


@pytest.mark.parametrize("spec, fragment", [
    (dict(json={"type": "strin"}), "not a valid JSON Schema"),
    (dict(json={"type": "string", "pattern": "(?<=a)b"}), "look-around"),
    (dict(regex="(unclosed"), "regex"),
    (dict(grammar="start: undefined_rule"), "undefined_rule"),
])
def test_unusable_grammars_name_the_param_and_reason(compiler, spec, fragment):
    with pytest.raises(ParamError) as info:
        compiler.compile(S(param="response_format", **spec))
    assert info.value.param == "response_format" and fragment in str(info.value)
    with pytest.raises(ParamError):  # refused again from the cache, same answer
        compiler.compile(S(param="response_format", **spec))


def test_params_model_free_checks():
    with pytest.raises(ParamError):
        S()  # nothing
    with pytest.raises(ParamError):
        S(regex="a", choice=["a"])  # two
    with pytest.raises(ParamError):
        S(json="{not json")
    with pytest.raises(ParamError):
        S(choice=[])
    with pytest.raises(ParamError):
        S(regex="\ud800")
    with pytest.raises(ParamError):
        S(regex="x" * ((1 << 20) + 1))
    S(regex="x" * (1 << 20))  # the limit itself is accepted
    with pytest.raises(ParamError):
        SamplingParams(structured_outputs={"json": {}})  # not a StructuredOutputsParams
    assert S(json='{"a":1}').key() == S(json={"a": 1}).key()
    assert S(json={"a": 1}, param="tools").key() == S(json={"a": 1}).key()


def test_compile_cache_and_timeout(tok):
    c = GrammarCompiler(tok, VOCAB, timeout_s=10.0)
    spec = S(json={"type": "object", "properties": {"x": {"type": "number"}}})
    t = time.perf_counter()
    first = c.compile(spec)
    assert c.compile(S(json={"type": "object", "properties": {"x": {"type": "number"}}})) is first
    durations, errors = c.drain_stats()
    assert len(durations) == 1 and errors == 0  # one compile for two requests
    c.timeout_s = 0.0  # a limit nothing meets: refused with a 400, never a hang
    with pytest.raises(ParamError, match="longer than"):
        c.compile(S(json={"type": "array", "items": {"type": "string", "maxLength": 7}}))
    assert c.drain_stats()[1] == 1
    assert time.perf_counter() - t < 30
    c.shutdown()


def test_close_objects_only_where_it_cannot_exclude_declared_keys(tok, compiler):
    from engine.structured.schema_strict import close_objects

    schema = {"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {}}},
                                               "c": {"allOf": [{"properties": {"x": {}}}, {"properties": {"y": {}}}]},
                                               "d": {"properties": {"z": {}}, "patternProperties": {"^q": {}}},
                                               "e": {"properties": {"k": {}}, "required": ["k", "undeclared"]}},
              "$defs": {"t": {"properties": {"u": {}}}}}
    closed = close_objects(schema)
    assert closed["additionalProperties"] is False and "additionalProperties" not in schema  # a copy
    assert closed["properties"]["a"]["additionalProperties"] is False
    assert closed["$defs"]["t"]["additionalProperties"] is False
    for member in closed["properties"]["c"]["allOf"]:
        assert "additionalProperties" not in member  # allOf members combine: left open
    assert "additionalProperties" not in closed["properties"]["d"]
    assert "additionalProperties" not in closed["properties"]["e"]
    strict = compiler.compile(S(json={"type": "object", "properties": {"a": {"type": "integer"}}})).new_matcher()
    loose = compiler.compile(S(json={"type": "object", "properties": {"a": {"type": "integer"}}},
                               allow_additional_properties=True)).new_matcher()
    extra = encode(tok, '{"a":1,"zz":2}')
    assert strict.validate_tokens(extra) < len(extra) and loose.validate_tokens(extra) == len(extra)
