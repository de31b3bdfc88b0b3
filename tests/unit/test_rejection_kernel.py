"""General-q rejection sampling: the torch reference is exact (chi-square, with a negative
test), and the Triton kernel reproduces it draw for draw under TRITON_INTERPRET=1 on CPU."""
import textwrap

import torch

from engine.spec.rejection import DraftBatch, rejection_sample_torch
from tests.unit.test_spec import chisquare_pvalue

from tests.unit.interpreter import assert_interpreted


def random_batch(gen, num_drafts: list[int], vocab: int, one_hot: bool = False, sharp: float = 1.0) -> DraftBatch:
    k = torch.tensor(num_drafts, dtype=torch.long)
    rows, drafts = int(k.sum()) + len(num_drafts), int(k.sum())
    p = (torch.randn(rows, vocab, generator=gen) * sharp).softmax(-1)
    q = None if one_hot else (torch.randn(drafts, vocab, generator=gen) * sharp).softmax(-1)
    ids = torch.multinomial(q, 1, generator=gen).squeeze(1) if q is not None else \
        torch.randint(0, vocab, (drafts,), generator=gen)
    return DraftBatch(p, q, ids, k, torch.rand(drafts, generator=gen),
                      torch.empty(rows, vocab).exponential_(generator=gen))


def sample_toy(n: int, residual_is_p: bool, seed: int = 0) -> torch.Tensor:
    """n independent requests, k = 2, fixed p_0, p_1 (and bonus p_2) and q_0, q_1; drafts drawn from q."""
    gen = torch.Generator().manual_seed(seed)
    p_pos = torch.tensor([[0.40, 0.25, 0.15, 0.10, 0.06, 0.04], [0.05, 0.05, 0.50, 0.20, 0.10, 0.10],
                          [0.30, 0.20, 0.10, 0.10, 0.20, 0.10]])
    q_pos = torch.tensor([[0.10, 0.40, 0.10, 0.30, 0.05, 0.05], [0.30, 0.10, 0.20, 0.20, 0.10, 0.10]])
    p = p_pos.repeat(n, 1)  # [3n, 6]: rows of request r are 3r, 3r + 1, 3r + 2
    q = q_pos.repeat(n, 1)  # [2n, 6]
    ids = torch.multinomial(q, 1, generator=gen).squeeze(1)
    batch = DraftBatch(p, q, ids, torch.full((n,), 2), torch.rand(2 * n, generator=gen),
                       torch.empty(3 * n, 6).exponential_(generator=gen))
    tokens, _ = rejection_sample_torch(batch, residual_is_p=residual_is_p)
    return tokens, p_pos


def test_general_q_sampler_is_exact_and_the_wrong_residual_is_caught():
    n = 40_000
    tokens, p_pos = sample_toy(n, residual_is_p=False)
    first = torch.bincount(tokens[:, 0], minlength=6)
    assert chisquare_pvalue(first, p_pos[0] * n) > 1e-3
    # The second token exists whenever the first draft was kept; given the prefix it is ~ p_1.
    second = tokens[:, 1][tokens[:, 1] >= 0]
    assert second.numel() > n // 4
    assert chisquare_pvalue(torch.bincount(second, minlength=6), p_pos[1] * second.numel()) > 1e-3
    wrong, _ = sample_toy(n, residual_is_p=True)
    assert chisquare_pvalue(torch.bincount(wrong[:, 0], minlength=6), p_pos[0] * n) < 1e-6


def test_reference_layout_and_edge_cases():
    gen = torch.Generator().manual_seed(1)
    batch = random_batch(gen, [3, 0, 1, 2], 50)
    tokens, acc = rejection_sample_torch(batch)
    assert tokens.shape == (4, 4)
    for r, k in enumerate([3, 0, 1, 2]):
        a = int(acc[r])
        assert 0 <= a <= k and (tokens[r, :a + 1] >= 0).all() and (tokens[r, a + 1:] == -1).all()
    # q == p: every draft accepted (u * q < p is u < 1), bonus drawn.
    same = DraftBatch(batch.target_probs[:2], batch.target_probs[:1], batch.target_probs[0].argmax()[None],
                      torch.tensor([1]), torch.tensor([0.999]), batch.exp_noise[:2])
    assert int(rejection_sample_torch(same)[1][0]) == 1
    # A draft with p(d) = 0 is always rejected and never emitted.
    p = torch.tensor([[0.0, 0.5, 0.5], [0.2, 0.3, 0.5]])
    zero = DraftBatch(p, torch.tensor([[0.9, 0.05, 0.05]]), torch.tensor([0]), torch.tensor([1]),
                      torch.tensor([0.0]), torch.ones(2, 3))
    tokens, acc = rejection_sample_torch(zero)
    assert int(acc[0]) == 0 and int(tokens[0, 0]) in (1, 2)


def test_triton_kernel_matches_torch_reference_in_interpreter():
    script = textwrap.dedent("""
        import torch
        from kernels.rejection import rejection_sample_triton
        from engine.spec.rejection import rejection_sample_torch
        from tests.unit.test_rejection_kernel import random_batch
        gen = torch.Generator().manual_seed(0)
        cases = [([3, 0, 1, 2], 50, False, 1.0), ([4, 4, 4], 1500, False, 3.0), ([2, 5, 0, 1, 3], 300, True, 4.0),
                 ([0, 0], 70, True, 1.0), ([1] * 6, 2100, False, 0.3)]
        for num_drafts, vocab, one_hot, sharp in cases:
            for _ in range(3):
                batch = random_batch(gen, num_drafts, vocab, one_hot, sharp)
                ref, ref_acc = rejection_sample_torch(batch)
                got, got_acc = rejection_sample_triton(batch)
                assert torch.equal(ref_acc, got_acc), (num_drafts, vocab, ref_acc, got_acc)
                assert torch.equal(ref, got), (num_drafts, vocab, ref, got)
        print("KERNEL_OK")
    """)
    assert_interpreted(script)
