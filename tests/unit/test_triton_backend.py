"""The Triton attention backend equals the torch backend on random shared-prefix forests
(decodes, prefill chunks, draft trees, GQA), in the Triton interpreter on CPU (in a
subprocess: the interpreter is chosen at import)."""
from __future__ import annotations

from tests.unit.interpreter import assert_interpreted

CHECK = r"""
import random, time
import torch
from engine.attention import AttentionShape
from tests.unit.test_shared_prefix_attention import _random_forest, _run
t0 = time.time()
rng = random.Random(5)
torch.manual_seed(5)
for heads, kv_heads in ((4, 2), (6, 3)):
    page, d = 4, 16
    shape = AttentionShape(heads, kv_heads, d, d ** -0.5, torch.float32, torch.device("cpu"))
    for trial in range(4):
        forest = _random_forest(rng, page)
        cache = torch.randn(max(max(t) for t in forest[0]) + 1, 2, page, kv_heads, d)
        n = sum(forest[2])
        qkv = (torch.randn(n, heads, d), torch.randn(n, kv_heads, d), torch.randn(n, kv_heads, d))
        ref, _ = _run("off", *forest, qkv, cache, shape, page)
        for mode in ("off", "on"):
            got, backend = _run(mode, *forest, qkv, cache, shape, page, backend="triton")
            assert backend.name == "triton" and (mode == "off") == (not backend.levels)
            diff = (got - ref).abs().max().item()
            assert diff <= 1e-5, (heads, trial, mode, diff)
print("KERNEL_OK", round(time.time() - t0, 1))
"""


def test_triton_backend_matches_torch_backend_in_interpreter():
    assert_interpreted(CHECK)
