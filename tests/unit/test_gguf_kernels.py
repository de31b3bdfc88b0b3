"""Our AVX2 GGUF kernels (kernels/cpu/gguf_linear.cpp) against gguf-py's dequantization +
torch matmul, on random blocks with finite scales, for every native format and the row
counts that matter (decode, small-M GEMM, the large-M path); the embedding lookup; the
per-module swap on the real model, and the fp32 fallback when the extension is missing."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from kernels import gguf_cpu

FORMATS = sorted(gguf_cpu.BLOCKS)  # Q4_0, Q4_1, Q8_0, Q4_K, Q6_K
# byte offsets of each format's fp16 scales inside a block (the rest is random quants)
HALVES = {2: [0], 3: [0, 2], 8: [0], 12: [0, 2], 14: [208]}


def width(qtype: int, k: int) -> int:
    """k rounded up to a whole number of the format's blocks (256 weights for K-quants)."""
    weights = gguf_cpu.BLOCKS[qtype][0]
    return -(-k // weights) * weights


@pytest.fixture(scope="module", autouse=True)
def built():
    # .ci/setup provides the compiler and builds the extension; its absence is a failure.
    assert gguf_cpu.available(), "the native GGUF kernels did not build (see the log line above)"


@pytest.fixture(params=["avx2", "avx512"])
def isa(request):
    """Each kernel test runs on AVX2 and, where the CPU has it, on the AVX-512 variants."""
    if request.param == "avx512" and not gguf_cpu.set_avx512(True):
        pytest.skip("this CPU has no AVX-512")
    gguf_cpu.set_avx512(request.param == "avx512")
    yield request.param
    gguf_cpu.set_avx512(True)


def random_blocks(rows: int, cols: int, qtype: int, seed: int = 0) -> torch.Tensor:
    """[rows, row_bytes] uint8: random quants (and K-quant sub-scales), fp16 scales finite."""
    weights, nbytes = gguf_cpu.BLOCKS[qtype]
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(rows, cols // weights, nbytes), dtype=np.uint8)
    for at in HALVES[qtype]:
        scales = (rng.standard_normal((rows, cols // weights)) * 0.05).astype(np.float16)
        blocks[:, :, at:at + 2] = scales.view(np.uint8).reshape(rows, cols // weights, 2)
    return torch.from_numpy(blocks.reshape(rows, -1).copy())


@pytest.mark.parametrize("qtype", FORMATS)
@pytest.mark.parametrize("m", [1, 2, 7, 16, 33, 64, 100, 129])
def test_linear_matches_dequantized_matmul(qtype, m, isa):
    n, k = 300, width(qtype, 224)  # n not a multiple of the tiles (8, 256 rows); K-quants 256
    w = random_blocks(n, k, qtype, seed=m)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
    ref = gguf_cpu.reference_linear(x, w, qtype, k)
    got = gguf_cpu.linear(x, w, qtype, n)
    assert got.shape == (m, n)
    tol = 1e-5 * ref.abs().amax(dim=1, keepdim=True)  # per row
    assert bool(((got - ref).abs() <= tol).all()), float((got - ref).abs().max())


@pytest.mark.parametrize("qtype", FORMATS)
def test_single_row_kernel_equals_the_small_m_path_bit_for_bit(qtype, isa):
    """M = 1 has its own kernel (weights dequantized in registers); each output row sums
    in the same order as the small-M tiles, so a row alone equals that row in a batch."""
    n, k = 301, 1536  # n not a multiple of the 4 rows per pass
    w = random_blocks(n, k, qtype, seed=3)
    x = torch.randn(2, k, generator=torch.Generator().manual_seed(3))
    assert torch.equal(gguf_cpu.linear(x[:1].contiguous(), w, qtype, n), gguf_cpu.linear(x, w, qtype, n)[:1])


@pytest.mark.parametrize("qtype", FORMATS)
def test_a_rows_result_does_not_depend_on_m(qtype, isa):
    """Above 64 rows the kernel runs near-equal chunks of the small-M tiles, so every row
    of a 129-row (prefill-sized) call equals that row computed alone, bit for bit."""
    n, k = 67, width(qtype, 224)
    w = random_blocks(n, k, qtype, seed=5)
    x = torch.randn(129, k, generator=torch.Generator().manual_seed(5))
    whole = gguf_cpu.linear(x, w, qtype, n)
    for i in (0, 42, 43, 100, 128):  # first and last rows of chunks [0, 43), [43, 86), [86, 129)
        assert torch.equal(whole[i:i + 1], gguf_cpu.linear(x[i:i + 1].contiguous(), w, qtype, n)), i


@pytest.mark.parametrize("qtype", FORMATS)
def test_embedding_rows_are_the_dequantized_rows(qtype):
    dim = width(qtype, 96)
    w = random_blocks(50, dim, qtype, seed=3)
    ids = torch.tensor([[0, 49, 7], [7, 3, 11]])
    table = gguf_cpu.dequantize(w, qtype, dim)
    assert torch.equal(gguf_cpu.embedding(ids, w, qtype, dim).view(2, 3, dim), table[ids])
    with pytest.raises(RuntimeError, match="out of range"):
        gguf_cpu.embedding(torch.tensor([50]), w, qtype, dim)


def test_bad_shapes_are_refused():
    w = random_blocks(8, 64, 8)
    with pytest.raises(RuntimeError):
        gguf_cpu.linear(torch.randn(2, 96), w, 8, 8)  # K does not match the rows' blocks
    with pytest.raises(RuntimeError):
        gguf_cpu.linear(torch.randn(2, 64), w, 13, 8)  # a format without a kernel (Q5_K)
    with pytest.raises(RuntimeError, match="multiple of 256"):
        gguf_cpu.linear(torch.randn(2, 64), random_blocks(8, 256, 12)[:, :36].contiguous(), 12, 8)


def test_real_model_runs_on_quantized_blocks(smol_loaded):
    """The default load keeps every SmolLM2 linear (Q4_1) and the tied Q8_0 embedding / LM
    head in blocks; nothing of the fp32 weights stays behind."""
    from engine.models.gguf_linear import GGUFEmbedding, GGUFLinear

    model = smol_loaded.model
    assert isinstance(model.embed_tokens, GGUFEmbedding) and isinstance(model.lm_head, GGUFLinear)
    for layer in model.layers:
        for attr in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"):
            assert isinstance(getattr(layer, attr), GGUFLinear)
    fp32_bytes = sum(p.numel() * 4 for p in model.parameters() if p.dtype == torch.float32)
    assert fp32_bytes < 1 << 20  # norms only


def test_fallback_without_the_extension(monkeypatch):
    """Without the extension the model loads dequantized, as before (a tiny GGUF-free check
    would not reach this path, so the real model is loaded again: ~2 s)."""
    from engine.config import EngineArgs
    from engine.models.gguf_linear import GGUFLinear
    from engine.setup import load_model

    monkeypatch.setattr(gguf_cpu, "available", lambda: False)
    loaded = load_model(EngineArgs())
    assert not any(isinstance(m, GGUFLinear) for m in loaded.model.modules())


def test_a_build_killed_midway_does_not_hang_the_next_load():
    """A process killed while it built leaves torch's `lock` file in the build directory;
    the next process must still load (before: it waited on that file forever)."""
    (gguf_cpu.build_dir() / "lock").touch()
    code = "from kernels import gguf_cpu; print(gguf_cpu.available())"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=str(Path(gguf_cpu.__file__).resolve().parents[1]))
    assert done.stdout.strip() == "True", done.stderr[-2000:]
    assert not (gguf_cpu.build_dir() / "lock").exists()


@pytest.mark.parametrize("k", [1536, 96 + 32 * 4])  # even and odd block counts (the VNNI pairs' tail)
@pytest.mark.parametrize("qtype", gguf_cpu.Q8_ACTIVATION_TYPES)
def test_q8_activation_kernel_is_the_integer_math_and_near_fp32(qtype, k, isa):
    """q8 mode (one row; AVX2, and AVX-512 VNNI where the CPU has it): equals its own math
    (activations quantized per 32-block, float64 reference) to fp32 rounding, and stays within
    2% of max|y| of the exact fp32 linear (its stated tolerance; a zero block quantizes to
    zeros, not NaN)."""
    n = 301
    w = random_blocks(n, k, qtype, seed=5)
    x = torch.randn(1, k, generator=torch.Generator().manual_seed(5))
    x[0, 64:96] = 0.0  # an all-zero activation block
    got = gguf_cpu.linear_q8(x, w, qtype, n)
    ref = gguf_cpu.reference_linear_q8(x, w, qtype, k)
    scale = float(ref.abs().max())
    assert float((got - ref).abs().max()) <= 1e-5 * scale
    exact = gguf_cpu.reference_linear(x, w, qtype, k)
    assert float((got - exact).abs().max()) <= 2e-2 * scale
    assert float((got - exact).abs().max()) > 1e-6 * scale  # it really ran on quantized activations


def test_q8_activation_kernel_refuses_what_it_does_not_run():
    with pytest.raises(RuntimeError, match="one row"):
        gguf_cpu.linear_q8(torch.randn(2, 64), random_blocks(8, 64, 8), 8, 8)
    with pytest.raises(RuntimeError, match="Q4_0, Q4_1 or Q8_0"):
        gguf_cpu.linear_q8(torch.randn(1, 256), random_blocks(8, 256, 12), 12, 8)


@pytest.mark.parametrize("m", [1, 2, 7, 16, 33])  # every M-tile remainder (tiles of 6 rows)
@pytest.mark.parametrize("qtype", gguf_cpu.Q8_ACTIVATION_TYPES)
def test_q8_tiles_are_the_integer_math_at_every_m(qtype, m, isa):
    """The packed q8 tiles (VNNI on avx512, portable scalar code on avx2) equal the q8 math
    (float64 reference) to fp32 rounding for any M and an N that is not a multiple of the
    16-row groups; padded rows of the last group are never written."""
    n, k = 40, 96 + 32 * 3
    w = random_blocks(n, k, qtype, seed=m)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
    x[0, 32:64] = 0.0  # an all-zero activation block
    got = gguf_cpu.linear_q8_tiles(x, gguf_cpu.pack_q8_tiles(w, qtype, k), qtype, n)
    assert got.shape == (m, n) and torch.isfinite(got).all()
    ref = gguf_cpu.reference_linear_q8(x, w, qtype, k)
    tol = 1e-5 * ref.abs().amax(dim=1, keepdim=True)
    assert bool(((got - ref).abs() <= tol).all()), float((got - ref).abs().max())
    exact = gguf_cpu.reference_linear(x, w, qtype, k)
    assert float((got - exact).abs().max()) > 1e-6 * float(ref.abs().max())  # quantized activations


@pytest.mark.parametrize("qtype", gguf_cpu.Q8_ACTIVATION_TYPES)
def test_q8_tiles_give_a_row_the_same_bits_whatever_m_and_isa(qtype):
    """A row's q8 result depends on that row only: the same bits alone or inside a 13-row
    batch, and the same bits from the VNNI and the portable scalar code (same integer dots,
    same order of the float operations), so q8 mode's output does not move with batching."""
    n, k = 37, 256
    w = random_blocks(n, k, qtype, seed=3)
    packed = gguf_cpu.pack_q8_tiles(w, qtype, k)
    x = torch.randn(13, k, generator=torch.Generator().manual_seed(3))
    runs = []
    for isa in ("avx512", "avx2"):
        if gguf_cpu.set_avx512(isa == "avx512") or isa == "avx2":
            runs.append(gguf_cpu.linear_q8_tiles(x, packed, qtype, n))
            alone = torch.cat([gguf_cpu.linear_q8_tiles(x[i:i + 1], packed, qtype, n) for i in range(13)])
            assert torch.equal(runs[-1], alone), isa
    gguf_cpu.set_avx512(True)
    assert all(torch.equal(r, runs[0]) for r in runs)


def test_q8_tiles_refuse_what_they_do_not_run():
    with pytest.raises(RuntimeError, match="Q4_0, Q4_1 or Q8_0"):
        gguf_cpu.pack_q8_tiles(random_blocks(8, 256, 12), 12, 256)
    w = random_blocks(20, 64, 3)
    with pytest.raises(RuntimeError, match="does not hold rows"):
        gguf_cpu.pack_q8_tiles(w, 3, 96)
    packed = gguf_cpu.pack_q8_tiles(w, 3, 64)
    with pytest.raises(RuntimeError, match="does not hold 40 rows"):
        gguf_cpu.linear_q8_tiles(torch.randn(2, 64), packed, 3, 40)  # 3 groups needed, 2 packed
    with pytest.raises(RuntimeError, match="does not hold"):
        gguf_cpu.linear_q8_tiles(torch.randn(2, 96), packed, 3, 20)
    with pytest.raises(RuntimeError, match="fp32"):
        gguf_cpu.linear_q8_tiles(torch.randn(2, 64, dtype=torch.float64), packed, 3, 20)


def test_q8_mode_on_the_real_model_tracks_fp32(smol_loaded):
    """`cpu_activation_quant="q8"` turns on every linear of the default model (Q4_1 layers,
    Q8_0 head; one-row calls everywhere, every call on VNNI); scoring a text one token at a time (the rows q8 changes), its
    greedy tokens agree with fp32's at >= 90% of positions and its perplexity stays within
    5% (loadtest/q8_quality.py measures a longer text: 96.9%, 11.33 -> 11.38)."""
    import importlib.util
    path = Path(__file__).resolve().parents[2] / "loadtest" / "q8_quality.py"
    spec = importlib.util.spec_from_file_location("q8_quality", path)
    q8_quality = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(q8_quality)
    model, tok = smol_loaded.model, smol_loaded.tokenizer
    # ~110 positions: q8 flips a near-tied argmax at ~3-4% of positions, and which ones moves with
    # any fp32 rounding upstream (a quantum boundary), so a short text would test noise.
    ids = tok("The heap queue algorithm keeps the smallest item at index zero, so a priority queue "
              "built on a list can pop it in logarithmic time. Pushing an item appends it to the list "
              "and sifts it up until its parent is no larger; popping swaps the last item into the "
              "root and sifts it down. Because the tree is stored in the list itself, no pointers are "
              "needed, and building a heap from an arbitrary list takes linear time, which is why "
              "the module offers heapify alongside push and pop.")["input_ids"]
    assert len(ids) >= 100
    target = torch.tensor(ids[1:])[:, None]
    try:
        assert q8_quality.set_q8(model, True) == 4 * len(model.layers) + 1
        q8, _ = q8_quality.score(model, ids)
    finally:
        q8_quality.set_q8(model, False)
    fp32, _ = q8_quality.score(model, ids)
    assert not torch.equal(q8, fp32)
    assert float((q8.argmax(-1) == fp32.argmax(-1)).float().mean()) >= 0.9
    ppl = [float((-lp.gather(1, target).mean()).exp()) for lp in (fp32, q8)]
    assert abs(ppl[1] - ppl[0]) <= 0.05 * ppl[0], ppl


def test_q8_mode_is_an_engine_option():
    from engine.config import EngineArgs
    from engine.models.gguf_linear import GGUFLinear
    from engine.setup import load_model

    with pytest.raises(ValueError, match="cpu_activation_quant"):
        load_model(EngineArgs(cpu_activation_quant="q4"))
    model = load_model(EngineArgs(cpu_activation_quant="q8")).model
    linears = [m for m in model.modules() if isinstance(m, GGUFLinear)]
    assert linears and all(m.q8 for m in linears)
    if not gguf_cpu.q8_tiles_fast():
        return  # without VNNI only one-row calls are q8 (test above); the rest stay exact fp32
    # On VNNI every call is q8, a batch too: not the fp32 result, but close to it.
    assert all(m.q8_tiles is not None for m in linears)
    down = model.layers[0].down_proj
    x = torch.randn(16, down.in_features, generator=torch.Generator().manual_seed(0))
    q8 = down(x)
    down.set_q8(False)
    exact = down(x)
    assert not torch.equal(q8, exact)
    assert float((q8 - exact).abs().max()) <= 2e-2 * float(exact.abs().max())


def test_native_tensors_are_never_dequantized(monkeypatch):
    """The modules are swapped before the weights load, so no tensor in a native format is
    dequantized to fp32 (only the norms, stored as F32, go through the fp32 loader)."""
    import gguf.quants

    from engine.config import EngineArgs
    from engine.setup import load_model

    seen = []
    real = gguf.quants.dequantize
    monkeypatch.setattr(gguf.quants, "dequantize", lambda data, qtype: seen.append(int(qtype)) or real(data, qtype))
    load_model(EngineArgs())
    assert seen and not set(seen) & set(gguf_cpu.BLOCKS), sorted(set(seen))
