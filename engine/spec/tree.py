"""Draft trees: shapes, the attention mask over a tree's query tokens, verification.

A speculative request's query tokens this step are its last committed token
(query 0, the root) followed by its k drafts (queries 1..k). A chain is the
tree in which draft i follows draft i - 1. A tree gives each draft a parent:
`parents[i]` in {-1, 0, .., i - 1}, -1 = the root, so parents precede their
children and every prefix of the draft list is again a tree (the scheduler may
truncate drafts to fit its budget). An empty `parents` means a chain.

Query j sits at position start + depth(j) and attends to the KV before the
root and to its own ancestors (itself included) among the query tokens; its KV
is written at slot start + j. After verification the accepted path's KV is
moved to slots start + depth, where a chain already has it.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch


def query_parents(parents: Sequence[int], k: int) -> list[int]:
    """Parent query index of each of the 1 + k query tokens (-1 for the root)."""
    if not parents:
        return list(range(-1, k))
    return [-1] + [p + 1 for p in parents[:k]]


def depths(qparents: Sequence[int]) -> list[int]:
    """Depth of each query token (the root is 0); parents precede children."""
    out: list[int] = []
    for p in qparents:
        out.append(0 if p < 0 else out[p] + 1)
    return out


def ancestor_mask(qparents: Sequence[int]) -> torch.Tensor:
    """[q, q] bool: True where query j may attend to query l (l is j or an ancestor of j)."""
    q = len(qparents)
    mask = torch.eye(q, dtype=torch.bool)
    for j, p in enumerate(qparents):
        if p >= 0:
            mask[j] |= mask[p]
    return mask


def path_to(qparents: Sequence[int], j: int) -> list[int]:
    """Query indices from the root's first child down to j (empty for the root)."""
    path: list[int] = []
    while j > 0:
        path.append(j)
        j = qparents[j]
    return path[::-1]


def is_chain(parents: Sequence[int]) -> bool:
    return all(p == i - 1 for i, p in enumerate(parents))


def accept_tree(drafts: Sequence[int], parents: Sequence[int], sampled: Sequence[int]
                ) -> tuple[list[int], list[int]]:
    """drafts [k] with `parents`, sampled [1 + k] (the target's sample at each query
    token) -> (tokens to commit [a + 1], the query index whose sample gave each).

    From the root, follow the child whose draft equals the target's sample at the
    current node; stop at the first node with no such child. Lossless exactly as a
    chain (engine/spec/verify.py): each step keeps the target's own sample."""
    qparents = query_parents(parents, len(drafts))
    children: dict[int, dict[int, int]] = {}
    for j in range(1, len(qparents)):
        children.setdefault(qparents[j], {}).setdefault(drafts[j - 1], j)
    node, tokens, rows = 0, [], []
    while True:
        x = sampled[node]
        tokens.append(x)
        rows.append(node)
        nxt = children.get(node, {}).get(x)
        if nxt is None:
            return tokens, rows
        node = nxt
