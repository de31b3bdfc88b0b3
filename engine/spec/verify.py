"""Verification of deterministic drafts (q one-hot on each proposed token).

The runner samples the target at every draft position and at the bonus
position exactly as normal sampling would (penalties counting the drafts
before each position, grammar masks, keyed noise for seeded rows), giving
x_0..x_k. Draft d_i is accepted iff d_0..d_i all equal x_0..x_i; the output is
the accepted drafts followed by x_a (the correction at the first mismatch, or
the bonus token when all k were accepted).

Lossless: P(keep d_i) = p_i(d_i), and on rejection x_i is a draw from p_i
conditioned on x_i != d_i, i.e. from norm(max(0, p_i - onehot(d_i))), which is
rejection sampling with q = onehot(d_i). Greedy rows accept the longest prefix
equal to the argmax. With noise keyed by (seed, position), x_i is the token the
non-speculative path would have sampled, so the output is the same for every k.
A draft tree (engine/spec/tree.py) is verified the same way along the path of
drafts that equal the target's samples.
"""
from __future__ import annotations

from collections.abc import Sequence

from engine.spec.tree import accept_tree


def accept_drafts(drafts: Sequence[int], sampled: Sequence[int]) -> list[int]:
    """drafts [k], sampled [k + 1] (the target's samples) -> the tokens to commit [a + 1]."""
    assert len(sampled) == len(drafts) + 1
    return accept_tree(drafts, (), sampled)[0]
