"""`recycling` drafter: Token Recycling (Luo et al., "Turning Trash into Treasure").

An adjacency matrix `[vocab, K]` holds, for each token t, the top-K ids of the
target's logits the last time t was an input whose logits were computed (every
sampled row of every step, rejected draft positions included: the "trash").
Drafting expands a tree from the request's last committed token: a node with
token t has children adj[t][0..K-1]. The tree's shape is a template over
(parent, rank) built best-first from the measured probability p_r that the
target's next token after t is adj[t][r] (counted on every committed token,
before the adjacency learns from that step), so a node's gain is the product
of p_rank along its path, nodes come in decreasing gain and each prefix of the
template is the best tree of its size. The controller picks the size.

State: the adjacency (vocab x K int32: 1.5 MB for SmolLM2 at K = 8) and the
rank counts are shared by all requests; no per-request state is kept.
"""
from __future__ import annotations

import heapq
from collections.abc import Sequence

import torch

from engine.spec.base import Drafter, Proposal, register_drafter

_REBUILD_EVERY = 32  # learn() calls between template rebuilds


@register_drafter("recycling")
class RecyclingDrafter(Drafter):
    def __init__(self, vocab_size: int, topk: int = 8, max_nodes: int = 64):
        if vocab_size <= 0 or not 1 <= topk <= 64:
            raise ValueError("recycling drafter needs vocab_size > 0 and 1 <= topk <= 64")
        self.logit_topk, self.max_nodes = topk, max_nodes
        self.adj = torch.full((vocab_size, topk), -1, dtype=torch.int32)  # -1: not seen yet
        self._adj = self.adj.numpy()  # host view for the per-node lookups
        # Rank r was the next token `hits[r]` times out of `seen` lookups of a known row;
        # the prior (a few pseudo-counts) keeps a cold start from building a useless tree.
        self.hits = [4.0 / (r + 2) for r in range(topk)]
        self.seen = 8.0
        self._calls = 0
        self.template = self._build_template()

    def rank_probs(self) -> list[float]:
        return [min(h / self.seen, 0.99) for h in self.hits]

    def _build_template(self) -> list[tuple[int, int, float]]:
        """(parent template index or -1, rank, gain) per node, best first."""
        probs = self.rank_probs()
        heap = [(-p, r, -1, r) for r, p in enumerate(probs) if p > 0]
        heapq.heapify(heap)
        nodes: list[tuple[int, int, float]] = []
        while heap and len(nodes) < self.max_nodes:
            neg, _, parent, rank = heapq.heappop(heap)
            nodes.append((parent, rank, -neg))
            me = len(nodes) - 1
            for r, p in enumerate(probs):
                if p > 0:
                    heapq.heappush(heap, (neg * p, me * len(probs) + r + len(probs), me, r))
        return nodes

    def propose(self, request_id: str, token_ids: Sequence[int], k: int) -> list[int]:
        return self.propose_tree(request_id, token_ids, k).chain_prefix()

    def propose_tree(self, request_id: str, token_ids: Sequence[int], k: int) -> Proposal:
        """The template's first k nodes that exist under the last token's adjacency."""
        if k <= 0 or not token_ids:
            return Proposal([])
        adj = self._adj
        root = token_ids[-1]
        where: list[int] = []  # template node -> draft index, or -1 when pruned
        drafts, parents, gains = [], [], []
        for parent, rank, gain in self.template:
            if len(drafts) >= k:
                break
            if parent >= 0 and where[parent] < 0:
                where.append(-1)
                continue
            parent_token = root if parent < 0 else drafts[where[parent]]
            token = int(adj[parent_token, rank])
            if token < 0:
                where.append(-1)
                continue
            where.append(len(drafts))
            drafts.append(token)
            parents.append(-1 if parent < 0 else where[parent])
            gains.append(gain)
        return Proposal(drafts, parents, gains)

    def learn(self, committed: Sequence[tuple[Sequence[int], int]],
              logit_topk: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        adj = self._adj
        for token_ids, num_new in committed:  # rank statistics before the rows change
            for i in range(len(token_ids) - num_new, len(token_ids)):
                if i <= 0:
                    continue
                row = adj[token_ids[i - 1]]
                if row[0] < 0:
                    continue
                self.seen += 1
                hit = (row == token_ids[i]).nonzero()[0]
                if hit.size:
                    self.hits[int(hit[0])] += 1
        if logit_topk is not None:
            inputs, top = logit_topk  # [S], [S, K] host tensors
            self.adj.index_copy_(0, inputs.long(), top.to(torch.int32))
        self._calls += 1
        if self._calls % _REBUILD_EVERY == 0:
            self.template = self._build_template()
