"""Native CPU paged attention (kernels/cpu/paged_attention.cpp) against its float64 reference,
and the `cpu` backend against the torch backend on mixed steps (decodes, verification chains,
long prefill chunks, draft trees, shared-prefix levels)."""
from __future__ import annotations

import dataclasses
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.attention import AttentionShape, build_layout, create_backend
from engine.attention.cascade import PrefixLevel
from engine.attention.cpu_native import NATIVE_MAX_Q
from engine.spec.tree import query_parents
from kernels import attention_cpu, gguf_cpu


@pytest.fixture(scope="module", autouse=True)
def built():
    assert gguf_cpu.available(), "the CPU extension did not build (see the log line above)"


def random_step(rng: random.Random, page: int, q_lens: list[int], extra: list[int], trees=None):
    """Scattered page tables for requests with q_lens[i] new tokens after extra[i] cached ones
    (trees: row -> query parents, a draft tree) -> (layout, tables)."""
    free = list(range(4 * sum(-(-(q + e) // page) for q, e in zip(q_lens, extra)) + 8))
    rng.shuffle(free)
    kv_lens = [q + e for q, e in zip(q_lens, extra)]
    tables, indptr = [], [0]
    for n in kv_lens:
        tables.append([free.pop() for _ in range(-(-n // page))])
        indptr.append(indptr[-1] + len(tables[-1]))
    layout, _ = build_layout(q_lens, kv_lens, indptr, sum(tables, []), page, torch.device("cpu"), trees)
    return layout, tables


def tensors(layout, heads: int, kv_heads: int, d: int, page: int, seed: int, spread: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    num_blocks = int(layout.kv_indices.max()) + 1
    cache = torch.randn(num_blocks, 2, page, kv_heads, d, generator=g)
    t = int(layout.qo_indptr[-1])
    q = torch.randn(t, heads, d, generator=g) * spread
    kv = torch.randn(t, 2 * kv_heads, d, generator=g)  # k and v as views of one tensor (v is in the model)
    return q, kv[:, :kv_heads], kv[:, kv_heads:], cache


@pytest.mark.parametrize("heads,kv_heads,d,page", [(9, 3, 64, 16), (4, 4, 32, 8), (8, 1, 128, 16), (32, 8, 64, 4),
                                                   (6, 2, 8, 3)])
def test_kernel_matches_softmax_attention_and_writes_the_new_kv(heads, kv_heads, d, page):
    rng = random.Random(heads * 100 + d)
    q_lens = [1, 1, 2, 7, 16, 33, 1, 5]
    extra = [0, page * 3 + 1, page - 1, 0, 2 * page, 9, 200, page]  # empty prefix, page ends, long contexts
    layout, _ = random_step(rng, page, q_lens, extra)
    q, k, v, cache = tensors(layout, heads, kv_heads, d, page, seed=d)
    rows = [0, 1, 2, 3, 4, 5, 6, 7]
    plan = attention_cpu.make_plan(layout, rows, heads, kv_heads, d ** -0.5)
    sentinel = 7.0
    out = torch.full_like(q, sentinel)
    attention_cpu.paged_attention(out, q, k, v, cache, plan)
    flat = cache.view(-1, kv_heads, d)
    slots = layout.slot_mapping
    k_rows = (slots // page) * 2 * page + slots % page
    assert torch.equal(flat[k_rows], k) and torch.equal(flat[k_rows + page], v)
    ref = attention_cpu.reference(q, cache, layout, rows, d ** -0.5)
    per_row = (out - ref).abs().amax(-1) / ref.abs().amax(-1)
    assert per_row.max().item() <= 1e-5


def test_kernel_is_stable_for_peaked_scores_and_leaves_unplanned_rows_alone():
    """Large logits (a near one-hot softmax) stay exact through the online max; tokens of rows
    not planned keep what `out` held (the torch groups fill them)."""
    page, heads, kv_heads, d = 16, 9, 3, 64
    layout, _ = random_step(random.Random(3), page, [1, 3, 1], [150, 40, 17])
    q, k, v, cache = tensors(layout, heads, kv_heads, d, page, seed=5, spread=40.0)
    plan = attention_cpu.make_plan(layout, [0, 2], heads, kv_heads, d ** -0.5)
    out = torch.full_like(q, 7.0)
    attention_cpu.paged_attention(out, q, k, v, cache, plan)
    ref = attention_cpu.reference(q, cache, layout, [0, 2], d ** -0.5)
    assert torch.all(out[1:4] == 7.0)
    for t in (0, 4):
        assert (out[t] - ref[t]).abs().max().item() <= 1e-5 * ref[t].abs().max().item()


def test_kernel_rejects_what_it_cannot_run():
    page, heads, kv_heads, d = 4, 4, 2, 16
    layout, _ = random_step(random.Random(1), page, [1], [5])
    q, k, v, cache = tensors(layout, heads, kv_heads, d, page, seed=1)
    plan = attention_cpu.make_plan(layout, [0], heads, kv_heads, d ** -0.5)
    with pytest.raises(RuntimeError, match="q_tile"):
        attention_cpu.paged_attention(torch.empty_like(q), q, k, v, cache, dataclasses.replace(plan, q_tile=17))
    with pytest.raises(RuntimeError, match="kv_cache"):
        attention_cpu.paged_attention(torch.empty_like(q), q, k, v, cache.double(), plan)
    assert not attention_cpu.supported(4, 2, 12) and not attention_cpu.supported(4, 2, 512)
    assert attention_cpu.supported(9, 3, 64) and attention_cpu.supported(64, 2, 8)
    assert not attention_cpu.supported(66, 1, 64)  # 66 query heads per KV head: more than one item's rows


def _both(layout, shape, q, k, v, cache, mode="auto"):
    outs, backends = [], []
    for name in ("cpu", "torch"):
        backend = create_backend(name, shape, shared_prefix=mode)
        backend.plan(layout)
        outs.append(backend.forward(q, k, v, cache.clone()))
        backends.append(backend)
    return outs, backends


def test_backend_equals_the_torch_backend_on_a_mixed_step():
    """Decodes, a verification chain and a chunk of NATIVE_MAX_Q tokens run natively; a longer
    prefill chunk and a draft tree go to torch's groups, in the same step."""
    page, heads, kv_heads, d = 16, 9, 3, 64
    shape = AttentionShape(heads, kv_heads, d, d ** -0.5, torch.float32, torch.device("cpu"))
    q_lens = [1, 5, NATIVE_MAX_Q, NATIVE_MAX_Q + 1, 4, 1]
    tree = {4: query_parents([-1, 0, 0], 3)}  # request 4: a root and three drafts in a tree
    layout, _ = random_step(random.Random(7), page, q_lens, [30, 12, 0, 20, 9, 64], tree)
    assert [i for i, _ in layout.tree_masks] == [4]
    q, k, v, cache = tensors(layout, heads, kv_heads, d, page, seed=11)
    (got, ref), (native, _) = _both(layout, shape, q, k, v, cache)
    assert sorted({int(r) for r in native.native.items[:, 0]}) == [0, 1, 2, 5]
    assert sorted(len(g.q_index) for g in native.groups) == [1, 1]  # the long chunk and the tree, torch
    assert (got - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()


def test_backend_decodes_alone_and_decomposed_levels_run_on_torch():
    page, heads, kv_heads, d = 8, 4, 2, 32
    shape = AttentionShape(heads, kv_heads, d, d ** -0.5, torch.float32, torch.device("cpu"))
    layout, tables = random_step(random.Random(2), page, [1, 1, 1], [23, 23, 40])
    q, k, v, cache = tensors(layout, heads, kv_heads, d, page, seed=2)
    (got, ref), (native, _) = _both(layout, shape, q, k, v, cache)
    assert native.native is not None and native.groups == []  # one op, no torch group
    assert (got - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()
    # requests 0 and 1 share their first two pages: a decomposed level keeps the step on torch
    shared = tables[0][:2]
    tables[1][:2] = shared
    indptr = [0, *torch.tensor([len(t) for t in tables]).cumsum(0).tolist()]
    layout, _ = build_layout([1, 1, 1], [24, 24, 41], indptr, sum(tables, []), page, torch.device("cpu"))
    layout = dataclasses.replace(layout, prefix_levels=(PrefixLevel(0, 2, (0, 1)),))
    (got, ref), (native, torch_backend) = _both(layout, shape, q, k, v, cache, mode="on")
    assert native.native is None and native.cascade.active and torch_backend.cascade.active
    assert (got - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()


def test_auto_picks_the_native_backend_for_fp32_cpu_only():
    cpu = torch.device("cpu")
    assert create_backend("auto", AttentionShape(9, 3, 64, 0.125, torch.float32, cpu)).name == "cpu"
    assert create_backend("auto", AttentionShape(9, 3, 64, 0.125, torch.bfloat16, cpu)).name == "torch"
    assert create_backend("auto", AttentionShape(4, 2, 12, 0.3, torch.float32, cpu)).name == "torch"


def test_engine_keeps_torch_attention_without_our_kernels(make_llm, monkeypatch):
    assert make_llm(num_kv_blocks=16).core.runner.attn.name == "cpu"
    assert make_llm(num_kv_blocks=16, cpu_native_kernels=False).core.runner.attn.name == "torch"
    monkeypatch.setattr(gguf_cpu, "available", lambda: False)  # no compiler / failed build
    assert make_llm(num_kv_blocks=16).core.runner.attn.name == "torch"


def test_the_named_backend_loads_our_extension_itself_and_refuses_a_shape_it_cannot_run():
    """`--no-cpu-native-kernels --attention-backend cpu` (dequantized linears, our attention):
    no native linear loads the extension, so the backend must; before it did, the first
    step failed inside the op lookup. A shape the op does not support is refused up front."""
    code = ("import torch\n"
            "from kernels import gguf_cpu\n"
            "from engine.attention.base import AttentionShape, create_backend\n"
            "assert gguf_cpu._loaded is None\n"
            "backend = create_backend('cpu', AttentionShape(9, 3, 64, 0.125, torch.float32, torch.device('cpu')))\n"
            "print(backend.name, callable(torch.ops.strix_cpu.paged_attention))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["cpu", "True"]
    with pytest.raises(ValueError, match="attention backend 'cpu'"):
        create_backend("cpu", AttentionShape(4, 2, 12, 0.3, torch.float32, torch.device("cpu")))
