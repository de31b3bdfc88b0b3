"""KV cache memory on the CPU: zero until written, and committed page by page as it is
written (a cache of hundreds of MiB costs no resident memory until requests use it)."""
from __future__ import annotations

import torch

from engine.runner.kv_memory import KVMemory

MIB = 1 << 20


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_cpu_cache_is_zero_and_committed_only_where_written():
    shape = (512, 2, 16, 4, 64)  # 8 MiB per layer
    before = rss_bytes()
    mem = KVMemory(32, shape, torch.float32, torch.device("cpu"))  # 256 MiB
    assert len(mem.layers) == 32 and all(t.shape == shape and t.dtype == torch.float32 for t in mem.layers)
    assert rss_bytes() - before < 32 * MIB  # torch.zeros would make all 256 MiB resident here
    layer = mem.layers[3]
    assert torch.count_nonzero(layer[:64]) == 0  # reads of never-written slots: zeros
    mem.layers[5].fill_(1.0)  # one layer written: its 8 MiB become resident, the rest stays untouched
    grown = rss_bytes() - before
    assert 8 * MIB <= grown < 48 * MIB
    assert torch.count_nonzero(mem.layers[4]) == 0 and torch.count_nonzero(mem.layers[6]) == 0
    assert float(mem.layers[5].sum()) == float(mem.layers[5].numel())


def test_runner_caches_live_in_one_lazily_committed_mapping(make_llm):
    runner = make_llm(num_kv_blocks=64).core.runner
    first, last = runner.kv_caches[0], runner.kv_caches[-1]
    per_layer = first.numel() * first.element_size()
    assert last.data_ptr() - first.data_ptr() == per_layer * (len(runner.kv_caches) - 1)  # one mapping
    assert runner.kv_memory.layers is runner.kv_caches


def test_zero_blocks_writes_zeros_over_those_blocks_in_every_layer():
    mem = KVMemory(3, (8, 2, 16, 2, 32), torch.float32, torch.device("cpu"))
    for layer in mem.layers:
        layer.fill_(1.0)
    mem.zero_blocks([2, 5])
    for layer in mem.layers:
        assert torch.count_nonzero(layer[[2, 5]]) == 0
        assert torch.count_nonzero(layer[[0, 1, 3, 4, 6, 7]]) == layer[0].numel() * 6
    mem.zero_blocks([])  # nothing to do
