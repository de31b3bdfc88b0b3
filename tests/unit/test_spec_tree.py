"""Draft trees: shapes and verification (engine/spec/tree.py), the tree mask in the
torch attention backend against attention over each root-to-node path, and the
recycling drafter's adjacency, rank statistics and best-first template."""
from __future__ import annotations

import random

import pytest
import torch

from engine.attention import AttentionShape, build_layout, create_backend
from engine.spec.base import Proposal
from engine.spec.recycling import RecyclingDrafter
from engine.spec.tree import accept_tree, ancestor_mask, depths, path_to, query_parents
from engine.spec.verify import accept_drafts

# drafts 10, 11 are children of the root; 12 of 10; 13 of 11; 14 of 13
DRAFTS, PARENTS = [10, 11, 12, 13, 14], [-1, -1, 0, 1, 3]


def test_tree_shapes():
    qp = query_parents(PARENTS, 5)
    assert qp == [-1, 0, 0, 1, 2, 4]
    assert depths(qp) == [0, 1, 1, 2, 2, 3]
    assert path_to(qp, 5) == [2, 4, 5] and path_to(qp, 0) == []
    mask = ancestor_mask(qp)
    assert mask[5].tolist() == [True, False, True, False, True, True]
    assert mask[3].tolist() == [True, True, False, True, False, False]
    assert query_parents((), 3) == [-1, 0, 1, 2]  # a chain


def test_accept_tree_follows_the_matching_child():
    # root samples 11 -> node 2 (draft 11); it samples 13 -> node 4; it samples 14 -> node 5; bonus 99
    assert accept_tree(DRAFTS, PARENTS, [11, 0, 13, 0, 14, 99]) == ([11, 13, 14, 99], [0, 2, 4, 5])
    assert accept_tree(DRAFTS, PARENTS, [10, 12, 0, 0, 0, 0]) == ([10, 12, 0], [0, 1, 3])
    assert accept_tree(DRAFTS, PARENTS, [7, 0, 0, 0, 0, 0]) == ([7], [0])


def test_chain_is_the_one_child_tree():
    rng = random.Random(0)
    for _ in range(200):
        k = rng.randint(0, 6)
        drafts = [rng.randint(0, 3) for _ in range(k)]
        sampled = [rng.randint(0, 3) for _ in range(k + 1)]
        kept, rows = accept_tree(drafts, list(range(-1, k - 1)), sampled)
        assert kept == accept_drafts(drafts, sampled) == accept_tree(drafts, (), sampled)[0]
        assert rows == list(range(len(kept)))


def _reference_attention(q, keys, values, scale, groups):
    """q [heads, d], keys/values [n, kv_heads, d] -> [heads, d]."""
    k = keys.repeat_interleave(groups, dim=1)  # [n, heads, d]
    v = values.repeat_interleave(groups, dim=1)
    w = torch.softmax(torch.einsum("hd,nhd->hn", q, k) * scale, dim=-1)
    return torch.einsum("hn,nhd->hd", w, v)


def test_tree_mask_attention_equals_attention_over_each_path():
    """A tree request beside a decode and a prefill chunk: each tree query attends to the
    prefix and its ancestors only (checked against attention over the path's keys)."""
    torch.manual_seed(0)
    page, heads, kv_heads, d = 4, 4, 2, 8
    shape = AttentionShape(heads, kv_heads, d, d ** -0.5, torch.float32, torch.device("cpu"))
    backend = create_backend("torch", shape)
    cache = torch.randn(16, 2, page, kv_heads, d)
    # rows: a decode (kv 7), the tree (prefix 5 + root + 5 drafts = kv 11), a chunk of 3 (kv 6)
    q_lens, kv_lens = [1, 6, 3], [7, 11, 6]
    tables = [[0, 1], [2, 3, 4], [5, 6]]
    kvp = [0, 2, 5, 7]
    qparents = query_parents(PARENTS, 5)
    layout, positions = build_layout(q_lens, kv_lens, kvp, sum(tables, []), page, torch.device("cpu"),
                                     trees={1: qparents})
    assert positions[1:7].tolist() == [5 + x for x in depths(qparents)]
    n = sum(q_lens)
    q, k, v = torch.randn(n, heads, d), torch.randn(n, kv_heads, d), torch.randn(n, kv_heads, d)
    backend.plan(layout)
    out = backend.forward(q, k, v, cache)

    def slot_kv(table, pos):
        blk, off = table[pos // page], pos % page
        return cache[blk, 0, off], cache[blk, 1, off]

    for row, (q_len, kv_len, table) in enumerate(zip(q_lens, kv_lens, tables)):
        first = kv_len - q_len
        for j in range(q_len):
            visible = list(range(first)) + (
                [first + a for a in [0] + path_to(qparents, j)] if row == 1 else list(range(first, first + j + 1)))
            keys = torch.stack([slot_kv(table, p)[0] for p in visible])
            vals = torch.stack([slot_kv(table, p)[1] for p in visible])
            t = layout.qo_indptr[row] + j
            ref = _reference_attention(q[t], keys, vals, shape.scale, heads // kv_heads)
            assert torch.allclose(out[t], ref, atol=1e-5), (row, j)


# ---- recycling drafter -------------------------------------------------------

def test_recycling_template_is_best_first():
    drafter = RecyclingDrafter(vocab_size=50, topk=4, max_nodes=20)
    nodes = drafter.template
    assert len(nodes) == 20
    gains = [g for _, _, g in nodes]
    assert gains == sorted(gains, reverse=True)
    probs = drafter.rank_probs()
    for i, (parent, rank, gain) in enumerate(nodes):
        assert parent < i
        expected = probs[rank] * (1.0 if parent < 0 else nodes[parent][2])
        assert gain == pytest.approx(expected)


def test_recycling_learns_adjacency_and_expands_trees():
    drafter = RecyclingDrafter(vocab_size=50, topk=3, max_nodes=10)
    assert drafter.propose_tree("r", [1, 2], 8) == Proposal([], [], [])  # nothing learned yet
    inputs = torch.tensor([2, 5])
    top = torch.tensor([[5, 6, 7], [8, 9, 4]])
    drafter.learn([], (inputs, top))
    prop = drafter.propose_tree("r", [1, 2], 10)
    # 2 -> {5, 6, 7}; 5 -> {8, 9, 4}; 6, 7, 8, ... unknown: pruned
    assert sorted(prop.drafts) == [4, 5, 6, 7, 8, 9]
    for tok, parent in zip(prop.drafts, prop.parents):
        parent_tok = 2 if parent < 0 else prop.drafts[parent]
        assert tok in top[inputs.tolist().index(parent_tok)].tolist()
    assert prop.gains == sorted(prop.gains, reverse=True)
    assert drafter.propose("r", [1, 2], 10) == prop.chain_prefix() == prop.drafts[:prop.parents.index(-1, 1)]


def test_recycling_rank_counts_use_the_rows_before_the_step_updates_them():
    drafter = RecyclingDrafter(vocab_size=50, topk=3)
    drafter.learn([], (torch.tensor([2]), torch.tensor([[5, 6, 7]])))
    hits, seen = list(drafter.hits), drafter.seen
    # token 2 was followed by 7 (rank 2 of the row 2 had before this step), then 9 (row 7 unknown)
    drafter.learn([([1, 2, 7, 9], 2)], (torch.tensor([2, 7]), torch.tensor([[7, 1, 3], [9, 1, 3]])))
    assert drafter.seen == seen + 1
    assert drafter.hits[2] == hits[2] + 1 and drafter.hits[:2] == hits[:2]
    assert drafter.adj[2].tolist() == [7, 1, 3] and drafter.adj[7].tolist() == [9, 1, 3]


# ---- the real model: a tree whose accepted path is never the first child ----

class _OracleTreeDrafter(RecyclingDrafter):
    """Drafts a tree around the known greedy continuation: a wrong first child of the root,
    the true next token as its second child, whose second child is the true token after
    it, then a third true token: the accepted path is queries 2, 4, 5 (their KV moves)."""

    def __init__(self, refs: dict[tuple[int, ...], list[int]], vocab_size: int):
        super().__init__(vocab_size)
        self.refs, self.vocab = refs, vocab_size

    def propose_tree(self, request_id, token_ids, k):
        prompt = next(p for p in self.refs if tuple(token_ids[:len(p)]) == p)
        ref = self.refs[prompt] + [0] * 4
        t1, t2, t3 = ref[len(token_ids) - len(prompt):][:3]
        drafts = [(t1 + 1) % self.vocab, t1, (t2 + 1) % self.vocab, t2, t3]
        return Proposal(drafts[:k], [-1, -1, 1, 1, 3][:k], [0.9, 0.9, 0.8, 0.8, 0.7][:k])


def test_tree_verification_moves_the_accepted_paths_kv(make_llm, hf_smol):
    from engine.sampling_params import SamplingParams
    from tests.unit.test_spec_engine import PROMPTS, assert_same_or_near_tie

    prompts = PROMPTS[:3]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    plain = make_llm()
    ref = plain.generate(prompts, params)
    llm = make_llm(speculative_method="recycling", num_speculative_tokens=5, speculative_adaptive=False)
    tok = llm.tokenizer
    refs = {tuple(tok.encode(p)): list(r.outputs[0].token_ids) for p, r in zip(prompts, ref)}
    llm.core.spec.drafter = _OracleTreeDrafter(refs, llm.core.spec.drafter.adj.shape[0])
    outs = llm.generate(prompts, params)
    for prompt, r, o in zip(prompts, ref, outs):
        assert_same_or_near_tie(hf_smol, plain, prompt, r.outputs[0], o.outputs[0])
    stats = llm.core.spec.totals
    # Every verification keeps its three true drafts, save the last two of each request
    # (max_tokens truncates their trees to 3 and 1 drafts): the KV of queries 2, 4, 5 was
    # moved to slots 1, 2, 3, or the next steps would differ.
    assert stats.num_drafts >= 4 * len(prompts), stats
    assert stats.accepted_per_position[2] >= stats.num_drafts - 2 * len(prompts), stats
    kv = llm.core.scheduler.kv
    assert kv.num_free_blocks == len(kv.pool.blocks)


def test_query_length_classes_pad_at_most_twice():
    """A verification (1 + k queries) is never padded to a prefill chunk's queries."""
    page = 4
    shape = AttentionShape(2, 1, 4, 0.5, torch.float32, torch.device("cpu"))
    backend = create_backend("torch", shape)
    q_lens = [1, 1, 5, 9, 3, 200]
    kv_lens = [q + 10 for q in q_lens]
    pages = [-(-kv // page) for kv in kv_lens]
    kvp = [0]
    for n in pages:
        kvp.append(kvp[-1] + n)
    layout, _ = build_layout(q_lens, kv_lens, kvp, list(range(kvp[-1])), page, torch.device("cpu"))
    backend.plan(layout)
    assert sum(int(g.q_valid.sum()) for g in backend.groups) == sum(q_lens)
    for g in backend.groups:
        real = g.q_valid.sum(1)  # [n] queries of each row
        assert g.q_valid.shape[1] < 2 * int(real.min()) or g.q_valid.shape[1] == 1
