"""Shared-prefix (Hydragen-style) attention in the torch backend: the decomposition over
random forests equals the plain path, reads each level's KV once, and the cost model."""
from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from engine.attention import AttentionShape, build_layout, create_backend
from engine.attention.cascade import CascadeCost, PrefixLevel, plan_cascade
from engine.spec.tree import query_parents


def _random_forest(rng: random.Random, page: int):
    """Requests whose page tables share nested leading runs (depth 1-3), plus loners.
    -> (tables, levels parents first, q_lens, kv_lens, trees)."""
    next_page = iter(range(10_000))
    num = rng.randint(3, 9)
    tables: list[list[int]] = [[] for _ in range(num)]
    levels: list[PrefixLevel] = []

    def level(members: list[int], first: int, depth: int) -> None:
        n_pages = rng.randint(1, 4)
        pages = [next(next_page) for _ in range(n_pages)]
        for m in members:
            tables[m].extend(pages)
        levels.append(PrefixLevel(first, n_pages, tuple(members)))
        if depth < 3:
            rest = list(members)
            rng.shuffle(rest)
            while len(rest) >= 2:
                size = rng.randint(1, len(rest))
                sub, rest = rest[:size], rest[size:]
                if len(sub) >= 2 and rng.random() < 0.7:
                    level(sorted(sub), first + n_pages, depth + 1)

    rows = list(range(num))
    rng.shuffle(rows)
    level(sorted(rows[:rng.randint(2, num - 1)]), 0, 1)
    q_lens, kv_lens, trees = [], [], {}
    for i, table in enumerate(tables):
        kind = rng.choice(["decode", "decode", "verify", "chunk"])
        q = {"decode": 1, "verify": rng.randint(2, 6), "chunk": rng.randint(3, 2 * page + 3)}[kind]
        own = q + rng.randint(0, 2 * page)
        kv = len(table) * page + own
        table.extend(next(next_page) for _ in range(-(-own // page)))
        q_lens.append(q)
        kv_lens.append(kv)
        if kind == "verify" and rng.random() < 0.5:
            parents = [rng.randint(-1, j - 1) for j in range(q - 1)]
            trees[i] = query_parents(parents, q - 1)
    return tables, levels, q_lens, kv_lens, trees


def _run(mode, tables, levels, q_lens, kv_lens, trees, qkv, cache, shape, page, backend="torch"):
    kvp = [0]
    for t in tables:
        kvp.append(kvp[-1] + len(t))
    layout, _ = build_layout(q_lens, kv_lens, kvp, sum(tables, []), page, torch.device("cpu"), trees)
    layout = dataclasses.replace(layout, prefix_levels=tuple(levels))
    attn = create_backend(backend, shape, shared_prefix=mode)
    attn.plan(layout)
    out = attn.forward(*qkv, cache.clone())
    return out, attn


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (9, 3), (2, 2)])
def test_decomposition_equals_plain_attention_on_random_forests(heads, kv_heads):
    rng = random.Random(heads * 7 + kv_heads)
    torch.manual_seed(heads)
    page, d = 4, 16
    shape = AttentionShape(heads, kv_heads, d, d ** -0.5, torch.float32, torch.device("cpu"))
    for trial in range(12):
        forest = _random_forest(rng, page)
        tables, levels, q_lens = forest[0], forest[1], forest[2]
        cache = torch.randn(max(max(t) for t in tables) + 1, 2, page, kv_heads, d) * 2
        n = sum(q_lens)
        qkv = (torch.randn(n, heads, d) * 2, torch.randn(n, kv_heads, d), torch.randn(n, kv_heads, d))
        plain, _ = _run("off", *forest, qkv, cache, shape, page)
        split, backend = _run("on", *forest, qkv, cache, shape, page)
        assert len(backend.cascade.levels) == len(levels)
        assert (split - plain).abs().max().item() <= 1e-5, trial


def test_each_level_is_read_once_and_members_read_only_their_own_keys():
    """16 decodes over a 64-token shared prefix, 8 of them also share 32 more tokens: the
    padded gathers cover only each request's own keys; each level's rows are gathered once."""
    page, heads, kv_heads, d = 16, 4, 2, 8
    shape = AttentionShape(heads, kv_heads, d, d ** -0.5, torch.float32, torch.device("cpu"))
    root, sub = list(range(4)), [4, 5]
    tables = [root + (sub if i < 8 else []) + [10 + i] for i in range(16)]
    kv_lens = [len(t) * page - 5 for t in tables]
    levels = [PrefixLevel(0, 4, tuple(range(16))), PrefixLevel(4, 2, tuple(range(8)))]
    cache = torch.randn(32, 2, page, kv_heads, d)
    qkv = (torch.randn(16, heads, d), torch.randn(16, kv_heads, d), torch.randn(16, kv_heads, d))
    forest = (tables, levels, [1] * 16, kv_lens, {})
    split, backend = _run("on", *forest, qkv, cache, shape, page)
    plain, plain_backend = _run("off", *forest, qkv, cache, shape, page)
    assert (split - plain).abs().max().item() <= 1e-5
    assert [lv.k_rows.numel() for lv in backend.levels] == [64, 32]
    (group,) = backend.groups
    assert group.k_rows.numel() == 16 * 11  # own keys only: 11 per request (padded to the longest)
    assert plain_backend.groups[0].k_rows.numel() == 16 * (7 * page - 5)
    assert backend.cascade.shared_tokens(page) == 16 * 64 + 8 * 32


def test_cost_model_and_left_out_parents():
    cost = CascadeCost(min_saved_tokens=256)
    levels = (PrefixLevel(0, 1, (0, 1, 2, 3)), PrefixLevel(1, 8, (0, 1)), PrefixLevel(1, 2, (2, 3)))
    # auto at 256: the root saves 3 x 16 rows, the first child with the root's page joined
    # 1 x 144, the second 1 x 48: none pays. At 100 only the first child does.
    plan = plan_cascade(levels, 4, 16, "auto", cost)
    assert plan.levels == () and plan.own_first_page == (0, 0, 0, 0)
    plan = plan_cascade(levels, 4, 16, "auto", CascadeCost(min_saved_tokens=100))
    assert plan.levels == (PrefixLevel(0, 9, (0, 1)),)  # the root's page joins the child
    assert plan.own_first_page == (9, 9, 0, 0)
    plan = plan_cascade(levels, 4, 16, "on", cost)
    assert plan.levels == levels and plan.own_first_page == (9, 9, 3, 3)
    assert plan_cascade(levels, 4, 16, "off", cost).levels == ()
    assert cost.pays(2, 256) and not cost.pays(2, 255)
    with pytest.raises(ValueError):
        plan_cascade(levels, 4, 16, "sometimes", cost)


def test_whole_batch_decode_group_skips_the_query_gather_and_stays_exact():
    """Decodes (one query each) form one unpadded group in token order: the backend uses
    the group's output as the step's (no gather/scatter; no mask when every key is
    visible); it equals a mixed batch's padded path and the kernels' torch reference."""
    from kernels.cascade_attention import paged_attention_lse_torch

    page, heads, kv_heads, d = 4, 6, 2, 16
    shape = AttentionShape(heads, kv_heads, d, d ** -0.5, torch.float32, torch.device("cpu"))
    cache = torch.randn(40, 2, page, kv_heads, d)
    for kv_lens in ([9, 9, 9], [5, 13, 2]):  # equal lengths: no mask; unequal: masked padding
        tables = [list(range(i * 4, i * 4 + -(-n // page))) for i, n in enumerate(kv_lens)]
        qkv = (torch.randn(3, heads, d), torch.randn(3, kv_heads, d), torch.randn(3, kv_heads, d))
        out, backend = _run("off", tables, [], [1, 1, 1], kv_lens, {}, qkv, cache, shape, page)
        (group,) = backend.groups
        assert group.whole_batch and (group.sdpa_mask is None) == (len(set(kv_lens)) == 1)
        written = cache.clone()
        backend.write_kv(written, qkv[1], qkv[2], backend.write_rows)
        rows = [2 * t[s // page] * page + s % page for t, n in zip(tables, kv_lens) for s in range(n)]
        indptr = torch.tensor([0, *torch.tensor(kv_lens).cumsum(0).tolist()], dtype=torch.int32)
        slots = [s for n in kv_lens for s in range(n)]
        ref, _ = paged_attention_lse_torch(
            qkv[0], written, d ** -0.5, torch.arange(3, dtype=torch.int32),
            torch.tensor([n - 1 for n in kv_lens], dtype=torch.int32), indptr,
            torch.tensor(rows, dtype=torch.int32), torch.tensor(slots, dtype=torch.int32))
        assert (out - ref).abs().max().item() <= 1e-5
