"""Unit tests for engine/output.py (CPU, no network; real SmolLM2 tokenizer from a GGUF)."""
from __future__ import annotations


import pytest

from engine.output import IncrementalDetokenizer, StopDecision, make_logprob_dicts
from engine.outputs import Logprob
from engine.sampling_params import SamplingParams


TEXTS = [
    "Hello, world!",
    " leading space and  double  spaces ",
    "  two leading spaces",
    "line one\nline two\n\n  indented\tTab\r\nCRLF",
    "Accents: café, naïve, résumé, Ærøskøbing, Ångström, ñandú",
    "Emoji: 😀🎉👍🏽 family 👨‍👩‍👧‍👦 flag 🇫🇷 done",
    "CJK: 世界你好，こんにちは、안녕하세요。漢字テスト",
    "Mixed: Grüße aus München 🍺 und 北京 — “quotes” … ellipsis",
    "Math ∑∫√∞ ≠ ≤ ≥ and arrows → ← ↔",
    "🦀🦀🦀",
    "   ",
    "\n",
    "x",
    "def f(x):\n    return x ** 2  # square\n",
    "Ελληνικά и русский текст עִבְרִית العربية",
]


@pytest.fixture(scope="module")
def tok(smol_gguf):
    """The embedded model's real tokenizer (a missing model fails, never skips)."""
    import transformers
    return transformers.AutoTokenizer.from_pretrained(str(smol_gguf.parent), gguf_file=smol_gguf.name)


@pytest.fixture(scope="module")
def chat_prompt(tok):
    return tok.encode("<|im_start|>user\nSay something<|im_end|>\n<|im_start|>assistant\n")


def ids_of(tok, *pieces: str) -> list[int]:
    """Token ids of `pieces` encoded separately (so step boundaries are known)."""
    return [i for p in pieces for i in tok.encode(p)]


def make(tok, prompt=(), eos=None, **kw) -> IncrementalDetokenizer:
    return IncrementalDetokenizer(tok, list(prompt), SamplingParams(**kw),
                                  [tok.eos_token_id] if eos is None else eos)


# -- incremental detokenization -------------------------------------------------

@pytest.mark.parametrize("with_prompt", [False, True])
@pytest.mark.parametrize("text", TEXTS)
def test_token_by_token_matches_full_decode(tok, chat_prompt, text, with_prompt):
    ids = tok.encode(text)
    det = make(tok, chat_prompt if with_prompt else [], max_tokens=None)
    previous = ""
    for t in ids:
        assert det.append([t]) is None
        assert "\ufffd" not in det.text
        assert det.text.startswith(previous)  # cumulative text only grows
        previous = det.text
    assert det.text == tok.decode(ids, skip_special_tokens=True)
    assert det.token_ids == ids


def test_multibyte_character_split_across_tokens_is_held(tok):
    ids = tok.encode("世")
    assert len(ids) > 1 and "\ufffd" in tok.decode(ids[:1])
    det = make(tok)
    det.append(ids[:1])
    assert det.text == ""
    det.append(ids[1:])
    assert det.text == "世"


@pytest.mark.parametrize("chunk", [2, 3, 7])
def test_multi_token_steps_match_full_decode(tok, chat_prompt, chunk):
    text = "".join(TEXTS)
    ids = tok.encode(text)
    det = make(tok, chat_prompt)
    for i in range(0, len(ids), chunk):
        assert det.append(ids[i:i + chunk]) is None
        assert "\ufffd" not in det.text
    assert det.text == tok.decode(ids, skip_special_tokens=True)


def test_special_tokens_skipped_or_kept(tok):
    ids = ids_of(tok, "Hi") + [1] + ids_of(tok, " there")  # 1 = <|im_start|>
    skipped = make(tok)
    skipped.append(ids)
    assert skipped.text == "Hi there"
    kept = make(tok, skip_special_tokens=False)
    kept.append(ids)
    assert kept.text == "Hi<|im_start|> there"


def test_repeated_skipped_specials_do_not_grow_window(tok):
    det = make(tok, ignore_eos=True)
    for _ in range(200):
        assert det.append([tok.eos_token_id]) is None
    det.append(ids_of(tok, "ok"))
    assert det.text == "ok"
    assert len(det.token_ids) == 201
    assert len(det._ids) < 10  # internal: EOS never entered the decode window


class FakeSentencePiece:
    """Tiny SentencePiece-like tokenizer: '▁' marks a space; decode strips the first one."""
    pieces = ["<eos>", "▁Hello", "▁world", "!", "▁foo", "bar"]
    all_special_ids = [0]

    def decode(self, ids, skip_special_tokens=False):
        toks = [self.pieces[i] for i in ids if not (skip_special_tokens and i == 0)]
        text = "".join(toks).replace("▁", " ")
        return text[1:] if text.startswith(" ") else text


def test_leading_space_tokenizer_keeps_inner_spaces():
    sp = FakeSentencePiece()
    ids = [1, 2, 3, 4, 5, 2]
    det = IncrementalDetokenizer(sp, [], SamplingParams(), [0])
    for t in ids:
        det.append([t])
    assert det.text == sp.decode(ids) == "Hello world! foobar world"
    # With prompt context the first token's space belongs to the continuation.
    det = IncrementalDetokenizer(sp, [4, 5], SamplingParams(), [0])
    for t in ids:
        det.append([t])
    assert det.text == " Hello world! foobar world"
    assert det.append([0]) == StopDecision("stop", None, 1)


# -- stop strings ------------------------------------------------------------------

def test_stop_string_spanning_two_tokens(tok):
    ids = ids_of(tok, "Hello", " world", ", goodbye")
    assert not any("o w" in tok.decode([i]) for i in ids)  # really spans tokens
    det = make(tok, stop=["o w"])
    assert det.append(ids[:1]) is None
    decision = det.append(ids[1:2])
    assert decision == StopDecision("stop", "o w", 1)
    assert det.text == "Hell"
    assert det.streamable_text(finished=True) == "Hell"


def test_include_stop_str_in_output(tok):
    ids = ids_of(tok, "Hello", " world", ", goodbye")
    det = make(tok, stop=["o w"], include_stop_str_in_output=True)
    for t in ids[:2]:
        decision = det.append([t])
    assert decision == StopDecision("stop", "o w", 1)
    assert det.text == "Hello w"


def test_tokens_after_stop_in_same_step_dropped(tok):
    ids = ids_of(tok, "one", " two", " three", " four", " five")
    lps = [{t: Logprob(-0.5, 1, "x")} for t in ids]
    det = make(tok, stop=["three"], logprobs=0)
    decision = det.append(ids, lps)
    assert decision == StopDecision("stop", "three", 3)
    assert det.token_ids == ids[:3]
    assert det.logprobs == lps[:3]
    assert det.text == "one two "
    # Nothing is appended after a finish.
    assert det.append(ids_of(tok, " six")) == StopDecision("stop", "three", 0)
    assert det.token_ids == ids[:3]


def test_earliest_stop_string_wins(tok):
    ids = ids_of(tok, "abc def ghi")
    det = make(tok, stop=["ghi", "def"])
    decision = det.append(ids)
    assert decision.stop_reason == "def"
    assert det.text == "abc "


def test_stop_string_inside_single_token(tok):
    ids = ids_of(tok, "The", " answer", " is", " yes")
    det = make(tok, stop=["nsw"])
    decision = det.append(ids)
    assert decision == StopDecision("stop", "nsw", 2)
    assert det.text == "The a"


def test_stop_string_respects_min_tokens(tok):
    ids = ids_of(tok, "a", " b", " a", " b")
    det = make(tok, stop=[" b"], min_tokens=3)
    decision = det.append(ids)
    assert decision == StopDecision("stop", " b", 4)
    assert det.text == "a b a"


# -- stop tokens ------------------------------------------------------------------

def test_eos_finishes_and_hides_text(tok):
    ids = ids_of(tok, "Hi there")
    det = make(tok, skip_special_tokens=False)
    decision = det.append(ids + [tok.eos_token_id] + ids_of(tok, " more"))
    assert decision == StopDecision("stop", None, len(ids) + 1)
    assert det.token_ids == ids + [tok.eos_token_id]
    assert det.text == "Hi there"  # "<|im_end|>" not shown


def test_stop_token_ids(tok):
    stop_id = ids_of(tok, " world")[0]
    ids = ids_of(tok, "Hello") + [stop_id] + ids_of(tok, " again")
    det = make(tok, stop_token_ids=[stop_id])
    decision = det.append(ids)
    assert decision == StopDecision("stop", stop_id, 2)
    assert det.token_ids == ids[:2]
    assert det.text == "Hello"


def test_min_tokens_delays_eos(tok):
    eos = tok.eos_token_id
    det = make(tok, min_tokens=3)
    assert det.append([eos]) is None
    assert det.append([eos]) is None
    assert det.append([eos]) == StopDecision("stop", None, 1)
    assert len(det.token_ids) == 3
    assert det.text == ""


def test_min_tokens_delays_stop_token_ids(tok):
    stop_id = ids_of(tok, "!")[0]
    det = make(tok, min_tokens=2, stop_token_ids=[stop_id])
    assert det.append([stop_id]) is None
    assert det.text == "!"  # not a stop yet, so its text counts
    assert det.append([stop_id]) == StopDecision("stop", stop_id, 1)
    assert det.text == "!"


def test_ignore_eos(tok):
    det = make(tok, ignore_eos=True)
    assert det.append([tok.eos_token_id] + ids_of(tok, "go on")) is None
    assert det.text == "go on"


def test_ignore_eos_still_honours_stop_token_ids(tok):
    eos = tok.eos_token_id
    det = make(tok, ignore_eos=True, stop_token_ids=[eos])
    assert det.append([eos]) == StopDecision("stop", eos, 1)


def test_multiple_eos_ids(tok):
    det = make(tok, eos=[tok.eos_token_id, 0])
    assert det.append(ids_of(tok, "x") + [0]) == StopDecision("stop", None, 2)


# -- streamable text ------------------------------------------------------------

def test_streamable_text_holds_back_possible_stop_prefix(tok):
    det = make(tok, stop=["STOP"])
    det.append(ids_of(tok, "Hello"))
    assert det.streamable_text(False) == "Hello"
    det.append(ids_of(tok, " ST"))
    assert det.text == "Hello ST"
    assert det.streamable_text(False) == "Hello "  # "ST" could start "STOP"
    assert det.streamable_text(True) == "Hello ST"
    det.append(ids_of(tok, "ART"))
    assert det.streamable_text(False) == "Hello START"  # released: not a stop
    det.append(ids_of(tok, " ST"))
    assert det.append(ids_of(tok, "OP")).stop_reason == "STOP"
    assert det.streamable_text(False) == det.text == "Hello START "


def test_streamable_text_only_holds_real_prefixes(tok):
    det = make(tok, stop=["abcdef"])
    det.append(ids_of(tok, "xyz ab"))
    assert det.streamable_text(False) == "xyz "
    det.append(ids_of(tok, "x"))
    assert det.streamable_text(False) == "xyz abx"


def test_streamable_text_without_stops_is_everything(tok):
    det = make(tok)
    det.append(ids_of(tok, "abc"))
    assert det.streamable_text(False) == "abc"


@pytest.mark.parametrize("stops", [["the"], [" a", "tion"], ["\n\n", "😀"], ["e", "ee"]])
def test_streamed_text_never_retracted(tok, stops):
    text = ("The nation's education station: a the theory. \n\n Emoji 😀 here "
            "and a final sentence with eee.")
    det = make(tok, stop=stops, include_stop_str_in_output=False)
    streamed = ""
    for t in tok.encode(text):
        decision = det.append([t])
        now = det.streamable_text(decision is not None)
        assert now.startswith(streamed)
        streamed = now
        if decision:
            break
    assert decision is not None and streamed == det.text
    assert not any(s in det.text for s in stops)


# -- logprobs ------------------------------------------------------------------

class CountingTokenizer:
    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    def decode(self, ids, skip_special_tokens=False):
        self.calls += 1
        return self.inner.decode(ids, skip_special_tokens=skip_special_tokens)


def test_make_logprob_dicts(tok):
    counting = CountingTokenizer(tok)
    a, b, c = ids_of(tok, "Hello")[0], ids_of(tok, " world")[0], tok.eos_token_id
    dicts = make_logprob_dicts(counting, [a, b], [-0.1, -2.0], [1, 3],
                               [[a, c], [a, c]], [[-0.1, -1.5], [-0.3, -1.0]])
    assert dicts[0] == {a: Logprob(-0.1, 1, "Hello"), c: Logprob(-1.5, 2, "<|im_end|>")}
    assert list(dicts[1]) == [b, a, c]  # sampled token first
    assert dicts[1][b] == Logprob(-2.0, 3, " world")
    assert dicts[1][a] == Logprob(-0.3, 1, "Hello")
    assert counting.calls == 3  # each id decoded once
    make_logprob_dicts(counting, [a], [-0.1], [1])
    assert counting.calls == 3


def test_make_logprob_dicts_without_topk(tok):
    a = ids_of(tok, "Hi")[0]
    assert make_logprob_dicts(tok, [a], [-0.25], [2]) == [{a: Logprob(-0.25, 2, "Hi")}]


def test_logprobs_none_when_not_requested(tok):
    det = make(tok)
    det.append(ids_of(tok, "x"), [{1: Logprob(0.0, 1, "x")}])
    assert det.logprobs is None
