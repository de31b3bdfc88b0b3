"""Bitmask apply: the torch reference against a per-token oracle, the grammar-wins
fallback in the sampler, and the Triton kernel against the reference under
TRITON_INTERPRET=1 on CPU (in a subprocess: the interpreter is chosen at import)."""
from __future__ import annotations

import textwrap

import torch

from engine.sample import Sampler, SamplingRow, build_sampling_metadata
from engine.sampling_params import SamplingParams
from engine.structured.bitmask import GrammarBitmask, apply_bitmask_torch, unpack_bitmask

from tests.unit.interpreter import assert_interpreted


def _random_mask(rows: int, vocab: int, gen: torch.Generator) -> torch.Tensor:
    words = (vocab + 31) // 32
    return torch.randint(-2 ** 31, 2 ** 31 - 1, (rows, words), generator=gen, dtype=torch.int64).to(torch.int32)


def test_torch_reference_matches_per_token_oracle():
    gen = torch.Generator().manual_seed(0)
    vocab = 100
    mask = _random_mask(2, vocab, gen)
    logits = torch.randn(4, vocab, generator=gen)
    out = logits.clone()
    apply_bitmask_torch(out, mask, torch.tensor([3, 1]))
    for r, row in ((0, 3), (1, 1)):
        for t in range(vocab):
            word = int(mask[r, t // 32]) & 0xFFFFFFFF
            allowed = (word >> (t % 32)) & 1
            assert out[row, t] == (logits[row, t] if allowed else float("-inf"))
    assert torch.equal(out[[0, 2]], logits[[0, 2]])  # unconstrained rows untouched
    assert unpack_bitmask(mask, vocab).shape == (2, vocab)


def _mask_allowing(vocab: int, allowed: list[int]) -> torch.Tensor:
    bits = torch.zeros(vocab + (-vocab) % 32, dtype=torch.int64)
    bits[allowed] = 1
    words = (bits.view(-1, 32) << torch.arange(32)).sum(1)
    return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32).unsqueeze(0)


def test_sampler_grammar_wins_over_min_tokens_and_bias():
    """The grammar allows only EOS; min_tokens bans EOS: the row still samples EOS."""
    vocab, eos = 64, 2
    logits = torch.randn(2, vocab, generator=torch.Generator().manual_seed(1))
    params = SamplingParams(temperature=0, min_tokens=5, logit_bias={7: 100.0})
    rows = [SamplingRow(params, [1], [], None, (eos,), "a"), SamplingRow(params, [1], [], None, (eos,), "b")]
    meta = build_sampling_metadata(rows, vocab, "cpu")
    grammar = GrammarBitmask(_mask_allowing(vocab, [eos]), torch.tensor([0]))
    out = Sampler()(logits.clone(), meta, grammar)
    assert out.sampled_token_ids.tolist() == [eos, 7]  # row 1 unconstrained: bias wins
    # a grammar allowing {5, 9}: argmax among them, whatever the bias on 7
    grammar = GrammarBitmask(_mask_allowing(vocab, [5, 9]), torch.tensor([1]))
    out = Sampler()(logits.clone(), build_sampling_metadata(rows, vocab, "cpu"), grammar)
    best = 5 if logits[1, 5] > logits[1, 9] else 9
    assert out.sampled_token_ids.tolist()[1] == best


def test_sampler_random_rows_only_draw_allowed_tokens():
    vocab = 64
    params = SamplingParams(temperature=1.5, top_p=0.9)
    rows = [SamplingRow(params, [1], [], None, (2,), "a")] * 8
    meta = build_sampling_metadata(rows, vocab, "cpu")
    allowed = [3, 30, 63]
    grammar = GrammarBitmask(_mask_allowing(vocab, allowed).repeat(8, 1), torch.arange(8))
    for _ in range(20):
        out = Sampler()(torch.randn(8, vocab), meta, grammar)
        assert set(out.sampled_token_ids.tolist()) <= set(allowed)


def test_triton_kernel_matches_torch_reference_in_interpreter():
    script = textwrap.dedent("""
        import torch
        from kernels.bitmask import apply_bitmask_triton
        from engine.structured.bitmask import apply_bitmask_torch
        gen = torch.Generator().manual_seed(0)
        for vocab, batch, rows in ((100, 3, [2, 0]), (1000, 4, [3]), (49152, 5, [4, 1, 0]), (50001, 2, [0, 1])):
            words = (vocab + 31) // 32
            mask = torch.randint(-2 ** 31, 2 ** 31 - 1, (len(rows), words), generator=gen,
                                 dtype=torch.int64).to(torch.int32)
            for dtype in (torch.float32, torch.bfloat16):
                logits = torch.randn(batch, vocab, generator=gen).to(dtype)
                a, b = logits.clone(), logits.clone()
                apply_bitmask_triton(a, mask, torch.tensor(rows))
                apply_bitmask_torch(b, mask, torch.tensor(rows))
                assert torch.equal(a, b), (vocab, dtype)
        print("KERNEL_OK")
    """)
    assert_interpreted(script)


class _CountingMatcher:
    """Fake matcher: its mask allows token (state + step) only; drafts advance the state."""

    def __init__(self, state: int, vocab: int):
        self.state, self.vocab = state, vocab

    def error(self):
        return None

    def _row(self, row: torch.Tensor, state: int) -> None:
        row.copy_(_mask_allowing(self.vocab, [state % self.vocab])[0])

    def fill_bitmask(self, rows: torch.Tensor, draft=()) -> None:
        for i in range(1 + len(draft)):
            self._row(rows[i], self.state + sum(draft[:i]))

    @classmethod
    def fill_many(cls, matchers, bitmask) -> None:
        for i, m in enumerate(matchers):
            m._row(bitmask[i], m.state)


def test_filler_masks_each_draft_row_after_the_drafts_before_it():
    from engine.structured.bitmask import BitmaskFiller

    vocab = 64
    a, b, c = _CountingMatcher(5, vocab), _CountingMatcher(9, vocab), _CountingMatcher(20, vocab)
    # rows: plain a | b with drafts (1, 2) on 3 rows | unconstrained | plain c
    matchers = [a, b, b, b, None, c]
    drafts = [(), (1, 2), (), (), (), ()]
    mask = BitmaskFiller(vocab, torch.device("cpu")).start(matchers, list("abbbxc"), drafts).result()
    assert mask.rows.tolist() == [0, 1, 2, 3, 5]
    allowed = unpack_bitmask(mask.bitmask, vocab)  # [R, V] bool
    assert [row.nonzero().flatten().tolist() for row in allowed] == [[5], [9], [10], [12], [20]]
