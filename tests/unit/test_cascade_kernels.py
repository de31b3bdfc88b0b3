"""kernels/cascade_attention.py: the torch references equal a per-token brute force (paged
keys in any order, causal slots, draft-tree masks, empty key sets, GQA), the exact LSE
merge of two disjoint key sets equals attending their union, and the Triton kernels equal
the references under TRITON_INTERPRET=1 on CPU (fp32 to 1e-5; fp16 to 1e-2, as the kernel
rounds the probabilities to fp16 for PV like FlashAttention), including a request that
sees no key (out 0, lse -inf) and the full cascade: own keys + shared prefix + merge ==
plain paged attention."""
from __future__ import annotations

import random

import torch

from kernels.cascade_attention import (merge_lse_torch_, paged_attention_lse_torch,
                                       prefix_attention_lse_torch)

from tests.unit.interpreter import assert_interpreted


def random_problem(rng: random.Random, heads: int, kv_heads: int, d: int, dtype=torch.float32,
                   page: int = 4, with_tree: bool = True) -> dict:
    """A flattened batch of 1-5 requests over a paged cache: each request's keys are its
    slots 0..kv_len-1 on shuffled pages, listed in shuffled order; its q_len query tokens
    are its last slots; some requests carry a random draft-tree mask; one may have no keys
    below its first query (kv_len == q_len == 1 keeps its own key)."""
    num_req = rng.randint(1, 5)
    q_lens = [rng.choice([1, 1, rng.randint(2, 6)]) for _ in range(num_req)]
    kv_lens = [q + rng.randint(0, 3 * page) for q in q_lens]
    pages_needed = sum(-(-kv // page) for kv in kv_lens)
    free = list(range(pages_needed + 3))
    rng.shuffle(free)
    token_req, token_slot, key_rows, key_slot, indptr = [], [], [], [], [0]
    tree_start, masks = [], []
    for r, (q, kv) in enumerate(zip(q_lens, kv_lens)):
        table = [free.pop() for _ in range(-(-kv // page))]
        keys = list(range(kv))
        rng.shuffle(keys)
        key_rows += [2 * table[s // page] * page + s % page for s in keys]
        key_slot += keys
        indptr.append(len(key_rows))
        token_req += [r] * q
        token_slot += list(range(kv - q, kv))
        tree = with_tree and q > 1 and rng.random() < 0.6
        tree_start.append(kv - q if tree else -1)
        mask = torch.ones(q, q, dtype=torch.bool).tril()
        if tree:  # a random ancestor set: each token sees itself and a random subset before it
            mask &= torch.rand(q, q, generator=torch.Generator().manual_seed(rng.randint(0, 99))) < 0.6
            mask |= torch.eye(q, dtype=torch.bool)
        masks.append(mask)
    T, max_q = len(token_req), max(q_lens)
    tree_mask = torch.zeros(T, max_q, dtype=torch.bool)
    t = 0
    for q, mask in zip(q_lens, masks):
        tree_mask[t:t + q, :q] = mask
        t += q
    i32 = dict(dtype=torch.int32)
    cache = (torch.randn(pages_needed + 3, 2, page, kv_heads, d) * 2).to(dtype)
    return dict(q=(torch.randn(T, heads, d) * 2).to(dtype), kv_cache=cache, scale=d ** -0.5,
                token_req=torch.tensor(token_req, **i32), token_slot=torch.tensor(token_slot, **i32),
                key_indptr=torch.tensor(indptr, **i32), key_rows=torch.tensor(key_rows, **i32),
                key_slot=torch.tensor(key_slot, **i32),
                tree_start=torch.tensor(tree_start, **i32) if with_tree else None,
                tree_mask=tree_mask if with_tree else None)


def brute_force(p: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Token by token, head by head: softmax over the allowed keys (fp64)."""
    q, cache, page = p["q"].double(), p["kv_cache"].double(), p["kv_cache"].shape[2]
    flat = cache.view(-1, *cache.shape[3:])
    T, H, D = q.shape
    g = H // cache.shape[3]
    out, lse = torch.zeros(T, H, D, dtype=torch.float64), torch.full((T, H), float("-inf"), dtype=torch.float64)
    ptr = p["key_indptr"].tolist()
    for t in range(T):
        r, my = int(p["token_req"][t]), int(p["token_slot"][t])
        start = -1 if p["tree_start"] is None else int(p["tree_start"][r])
        keys = []
        for i in range(ptr[r], ptr[r + 1]):
            s = int(p["key_slot"][i])
            if s > my or (start >= 0 and s >= start and not p["tree_mask"][t, s - start]):
                continue
            keys.append(int(p["key_rows"][i]))
        if not keys:
            continue
        for h in range(H):
            k, v = flat[keys, h // g], flat[[k + page for k in keys], h // g]
            scores = k @ q[t, h] * p["scale"]
            lse[t, h] = torch.logsumexp(scores, 0)
            out[t, h] = torch.softmax(scores, 0) @ v
    return out, lse


def test_paged_reference_equals_brute_force():
    rng = random.Random(1)
    for heads, kv_heads, d in ((4, 2, 8), (3, 3, 5), (6, 2, 16)):
        for _ in range(6):
            p = random_problem(rng, heads, kv_heads, d)
            out, lse = paged_attention_lse_torch(**p)
            want_out, want_lse = brute_force(p)
            assert torch.allclose(out.double(), want_out, atol=1e-5)
            assert torch.equal(torch.isinf(lse), torch.isinf(want_lse))
            assert torch.allclose(lse.double(), want_lse, atol=1e-5)


def test_merge_of_disjoint_key_sets_equals_their_union():
    """Split each request's keys in two (some halves empty): merging the halves' (out, lse)
    gives the union's; a prefix set every token sees merges the same way."""
    rng = random.Random(2)
    for _ in range(8):
        p = random_problem(rng, 4, 2, 8, with_tree=False)
        ptr = p["key_indptr"].tolist()
        halves = ([], []), ([], [])
        indptr = [[0], [0]]
        for r in range(len(ptr) - 1):
            cut = rng.randint(ptr[r], ptr[r + 1])
            for side, (lo, hi) in enumerate(((ptr[r], cut), (cut, ptr[r + 1]))):
                halves[side][0].extend(p["key_rows"][lo:hi].tolist())
                halves[side][1].extend(p["key_slot"][lo:hi].tolist())
                indptr[side].append(len(halves[side][0]))
        parts = [paged_attention_lse_torch(**{**p, "key_indptr": torch.tensor(indptr[s], dtype=torch.int32),
                                              "key_rows": torch.tensor(halves[s][0], dtype=torch.int32),
                                              "key_slot": torch.tensor(halves[s][1], dtype=torch.int32)})
                 for s in (0, 1)]
        out, lse = parts[0][0].clone(), parts[0][1].clone()
        merge_lse_torch_(out, lse, *parts[1], torch.arange(out.shape[0]))
        want_out, want_lse = paged_attention_lse_torch(**p)
        assert torch.allclose(out, want_out, atol=1e-5) and torch.allclose(lse, want_lse, atol=1e-5)


def test_prefix_reference_equals_paged_over_the_same_keys():
    rng = random.Random(3)
    p = random_problem(rng, 6, 3, 8, with_tree=False)
    prefix_rows = torch.tensor([2 * b * 4 + o for b in (0, 1) for o in range(4)], dtype=torch.int32)
    q_index = torch.tensor(sorted(rng.sample(range(p["q"].shape[0]), max(1, p["q"].shape[0] // 2))))
    out, lse = prefix_attention_lse_torch(p["q"], p["kv_cache"], p["scale"], q_index, prefix_rows)
    n = len(q_index)
    want_out, want_lse = paged_attention_lse_torch(
        p["q"][q_index], p["kv_cache"], p["scale"], torch.arange(n, dtype=torch.int32),
        torch.full((n,), 99, dtype=torch.int32), torch.arange(n + 1, dtype=torch.int32) * len(prefix_rows),
        prefix_rows.repeat(n), torch.zeros(n * len(prefix_rows), dtype=torch.int32))  # every key visible
    assert torch.allclose(out, want_out, atol=1e-5) and torch.allclose(lse, want_lse, atol=1e-5)


INTERPRETED = r"""
import random, time
import torch
from kernels.cascade_attention import *
from tests.unit.test_cascade_kernels import random_problem

t0 = time.time()
rng = random.Random(7)
torch.manual_seed(7)

def close(got, want, tol, what):
    for g, w in zip(got, want):
        assert torch.equal(torch.isinf(g), torch.isinf(w)) if g.dim() == 2 else True, what
        finite = torch.isfinite(w)
        diff = (g.float() - w.float())[finite].abs().max().item() if finite.any() else 0.0
        assert diff <= tol, (what, diff)

for dtype, tol in ((torch.float32, 1e-5), (torch.float16, 1e-2)):
    for heads, kv_heads, d in ((4, 2, 16), (3, 3, 24), (8, 1, 16)):
        for trial in range(3):
            p = random_problem(rng, heads, kv_heads, d, dtype=dtype)
            close(paged_attention_lse(**p), paged_attention_lse_torch(**p), tol, ("paged", dtype, heads, trial))
            hidden = {**p, "key_slot": p["key_slot"].clone()}
            hidden["key_slot"][:int(p["key_indptr"][1])] = 10 ** 6  # request 0 sees no key
            got = paged_attention_lse(**hidden)
            assert torch.isinf(got[1][:int((p["token_req"] == 0).sum())]).all()
            close(got, paged_attention_lse_torch(**hidden), tol, ("no key", dtype))
            # The prefix kernel with several row programs (N * G > 64) and key tiles (P > 64).
            n_tok, n_keys = 70 // (heads // kv_heads) + 3, 72
            q = (torch.randn(n_tok + 5, heads, d) * 2).to(dtype)
            cache = (torch.randn(40, 2, 4, kv_heads, d) * 2).to(dtype)
            rows = torch.tensor(rng.sample([2 * b * 4 + o for b in range(40) for o in range(4)], n_keys),
                                dtype=torch.int32)
            q_index = torch.tensor(rng.sample(range(n_tok + 5), n_tok), dtype=torch.int32)
            close(prefix_attention_lse(q, cache, d ** -0.5, q_index, rows),
                  prefix_attention_lse_torch(q, cache, d ** -0.5, q_index, rows), tol, ("prefix", dtype, heads))
            # Merge, including empty (-inf) parts on either side.
            out, lse = paged_attention_lse_torch(**p)
            part_out, part_lse = torch.randn_like(out), torch.randn(lse.shape) * 3
            part_lse[0] = float("-inf")
            index = torch.tensor(rng.sample(range(out.shape[0]), out.shape[0]), dtype=torch.int32)
            o1, l1, o2, l2 = out.clone(), lse.clone(), out.clone(), lse.clone()
            merge_lse_(o1, l1, part_out, part_lse, index)
            merge_lse_torch_(o2, l2, part_out, part_lse, index)
            close((o1, l1), (o2, l2), tol, ("merge", dtype))

# The cascade: a shared prefix (pages 0-2) + each request's own pages, in kernels only,
# equals the paged kernel over all keys.
page, heads, kv_heads, d = 4, 6, 2, 16
cache = torch.randn(30, 2, page, kv_heads, d)
own_lens = [1, 5, 3, 9]  # keys after the prefix; the last q_len of them are the queries
q_lens = [1, 2, 3, 1]
prefix = [0, 1, 2]
all_rows, all_slot, own_rows, own_slot, ip_all, ip_own = [], [], [], [], [0], [0]
token_req, token_slot, next_page = [], [], 3
for r, (n_own, q) in enumerate(zip(own_lens, q_lens)):
    table = prefix + list(range(next_page, next_page + -(-n_own // page)))
    next_page += -(-n_own // page)
    kv = len(prefix) * page + n_own
    for s in range(kv):
        row = 2 * table[s // page] * page + s % page
        all_rows.append(row); all_slot.append(s)
        if s >= len(prefix) * page:
            own_rows.append(row); own_slot.append(s)
    ip_all.append(len(all_rows)); ip_own.append(len(own_rows))
    token_req += [r] * q; token_slot += list(range(kv - q, kv))
i32 = lambda x: torch.tensor(x, dtype=torch.int32)
q = torch.randn(len(token_req), heads, d)
full = paged_attention_lse(q, cache, d ** -0.5, i32(token_req), i32(token_slot), i32(ip_all), i32(all_rows),
                           i32(all_slot))
out, lse = paged_attention_lse(q, cache, d ** -0.5, i32(token_req), i32(token_slot), i32(ip_own), i32(own_rows),
                               i32(own_slot))
rows = i32([2 * b * page + o for b in prefix for o in range(page)])
members = i32(range(len(token_req)))
merge_lse_(out, lse, *prefix_attention_lse(q, cache, d ** -0.5, members, rows), members)
close((out, lse), full, 1e-5, "cascade")
print("KERNEL_OK", round(time.time() - t0, 1))
"""


def test_kernels_equal_references_in_interpreter():
    assert_interpreted(INTERPRETED)
