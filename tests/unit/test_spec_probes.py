"""The adaptive controller's start-up probes leave the KV cache as a fresh one: no page
mapped to the kernel's shared zero page (read before written: its first real write
later costs a copy-on-write fault with a TLB shootdown, which left the engine's B = 64
decode steps 7% slower for its whole run), the pool's free order unchanged, and only
the pages of the largest probe touched."""
from __future__ import annotations

import os
import struct

import pytest

from engine.spec.decoder import probe_shapes
from engine.kv.manager import cdiv
from engine.spec.probes import CONTEXT_ROWS, CONTEXT_TOKENS, DRAFT_PASS_ROWS, LONG_CONTEXT

PAGE = os.sysconf("SC_PAGE_SIZE")
pytestmark = pytest.mark.skipif(not os.access("/proc/self/pagemap", os.R_OK), reason="needs Linux pagemap")


def kv_pages(kv_memory) -> tuple[int, int]:
    """(pages the process owns, pages mapped to the shared zero page) of the KV mapping.
    /proc/self/pagemap: bit 63 = present, bit 56 = exclusively mapped (the zero page,
    shared by every process, is present but never exclusive)."""
    first, last = kv_memory.layers[0], kv_memory.layers[-1]
    start = first.data_ptr() // PAGE
    end = cdiv(last.data_ptr() + last.numel() * last.element_size(), PAGE)
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(start * 8)
        entries = struct.unpack(f"<{end - start}Q", f.read((end - start) * 8))
    present = [e for e in entries if e >> 63 & 1]
    owned = sum(e >> 56 & 1 for e in present)
    return owned, len(present) - owned


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from engine.config import EngineArgs
    from engine.setup import load_model
    from tests.e2e.tiny_model import build_tiny_model

    path = build_tiny_model(tmp_path_factory.mktemp("tiny") / "llama")
    return path, load_model(EngineArgs(model=str(path), max_model_len=256))


# layerskip and draft also probe draft passes (draft: the target as its own draft, on its own KV
# or on the target's, "draft-shared", which probes no catch-up)
@pytest.mark.parametrize("method", ["ngram", "layerskip", "draft", "draft-shared"])
def test_probes_leave_no_zero_page_mappings_and_the_free_order_as_it_was(tiny, method):
    from engine.llm import LLM

    path, loaded = tiny
    max_seqs, k = 16, 4
    draft = method.startswith("draft")
    llm = LLM(loaded=loaded, max_num_seqs=max_seqs, kv_cache_memory=16 << 20,
              speculative_method="draft" if draft else method, num_speculative_tokens=k, speculative_adaptive=True,
              speculative_model=str(path) if draft else None,
              speculative_draft_kv="shared" if method == "draft-shared" else "own")
    core = llm.core
    kv, memory = core.scheduler.kv, core.runner.kv_memory
    assert core.spec.controller.latency.knots[-1] == max_seqs * (k + 1)  # every probe ran
    owned, zero_mapped = kv_pages(memory)
    assert zero_mapped == 0
    if method == "draft":
        assert core.spec.controller.catchup_per_token > 0
        assert kv_pages(core.runner.model_drafter.kv_memory)[1] == 0
    if method == "draft-shared":
        drafter = core.runner.model_drafter
        assert drafter.kv_memory is None and drafter.kv_caches is core.runner.kv_caches
        assert core.spec.controller._backlog == [0.0, 0.0]  # no catch-up probe, none to learn
    assert kv.pool.free_order() == list(range(kv.pool.num_blocks))
    # Touched: the shared context's blocks and one block per row of the largest probe (a
    # step's rows, or a draft pass's) or the context-cost probes' rows of their own longer
    # context (within max_model_len) and k + 1 tokens, in every layer.
    block_bytes = memory.layers[0][0].numel() * memory.layers[0].element_size()
    most_rows = max(*DRAFT_PASS_ROWS, *(rows for rows, _ in probe_shapes(k, max_seqs * (k + 1), max_seqs)))
    bs = kv.block_size
    long = min(LONG_CONTEXT * CONTEXT_TOKENS, (core.scheduler.config.max_model_len - k - 1) // bs * bs)
    blocks = CONTEXT_TOKENS // bs + max(most_rows, CONTEXT_ROWS * cdiv(long + k + 1, bs))
    assert 0 < owned <= len(memory.layers) * cdiv(blocks * block_bytes, PAGE) + 2
    out = llm.generate(["The cat"], __import__("engine").SamplingParams(max_tokens=4, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 4
    assert kv.num_free_blocks == kv.pool.num_blocks


def test_a_catch_up_probe_no_slower_than_the_pass_line_is_not_priced_free(monkeypatch):
    """The catch-up rate is the probe's 128-token pass 0 beyond the line's one-row pass,
    per backlog token. On a tiny draft model a noisy line (one suite run here) put D(1)
    above that pass and the rate at 0: catch-ups priced free. Then the whole pass per
    token is the rate."""
    from engine.spec import probes
    from engine.spec.latency import LatencyModel

    class Scratch:
        context = 128

    class Drafter:
        keeps_kv = True

    monkeypatch.setattr(probes, "measure_latency", lambda *a, **k: LatencyModel(0.006, 0.0005))
    monkeypatch.setattr(probes, "best_time", lambda run, repeats: 0.0060 + 0.0005 + 127 * 0.0004)
    assert probes.measure_draft_costs(Scratch(), Drafter())[1] == pytest.approx(0.0004)
    monkeypatch.setattr(probes, "best_time", lambda run, repeats: 0.004)  # below D(1) = 6.5 ms
    assert probes.measure_draft_costs(Scratch(), Drafter())[1] == pytest.approx(0.004 / 128)
    Drafter.keeps_kv = False  # on the target's KV: nothing to catch up on, no probe
    assert probes.measure_draft_costs(Scratch(), Drafter())[1] is None
