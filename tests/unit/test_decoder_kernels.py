"""Fused CPU decoder ops (kernels/cpu/decoder_ops.cpp) against the model's own torch modules:
RoPE bit for bit, RMSNorm (alone and after the residual add) to fp32 rounding, at the row
counts that matter; and the real model's layers running them."""
from __future__ import annotations

import pytest
import torch

from engine.models.llama import RMSNorm, apply_rotary
from kernels import decoder_cpu, gguf_cpu


@pytest.fixture(scope="module", autouse=True)
def built():
    assert gguf_cpu.available(), "the CPU extension did not build (see the log line above)"


def norm_module(d: int, seed: int) -> RMSNorm:
    norm = RMSNorm(d, 1e-5)
    norm.weight.data = torch.randn(d, generator=torch.Generator().manual_seed(seed))
    norm.weight.requires_grad_(False)
    return norm


@pytest.mark.parametrize("n", [1, 3, 16, 70])
def test_rms_norm_matches_the_torch_module(n):
    d = 576
    norm = norm_module(d, n)
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(n)) * 3
    ref = norm(x)
    got = decoder_cpu.rms_norm(x, norm.weight, norm.eps)
    torch.testing.assert_close(got, ref, rtol=2e-6, atol=2e-6 * float(ref.abs().max()))


@pytest.mark.parametrize("n", [1, 17])
def test_add_rms_norm_returns_the_sum_exactly_and_its_norm(n):
    d = 64
    norm = norm_module(d, 7)
    g = torch.Generator().manual_seed(n)
    x, r = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    s, h = decoder_cpu.add_rms_norm(x, r, norm.weight, norm.eps)
    assert torch.equal(s, x + r)
    torch.testing.assert_close(h, norm(x + r), rtol=2e-6, atol=2e-6 * float(h.abs().max()))


@pytest.mark.parametrize("n", [1, 5, 33])
def test_rope_of_the_fused_projection_is_bit_identical(n):
    hq, hkv, d = 9, 3, 64
    g = torch.Generator().manual_seed(n)
    qkv = torch.randn(n, (hq + 2 * hkv) * d, generator=g)
    angles = torch.rand(n, 1, d, generator=g) * 100
    cos, sin = angles.cos(), angles.sin()
    q, k = decoder_cpu.rope_qkv(qkv, cos, sin, hq, hkv)
    assert torch.equal(q, apply_rotary(qkv[:, :hq * d].reshape(n, hq, d), cos, sin))
    assert torch.equal(k, apply_rotary(qkv[:, hq * d:(hq + hkv) * d].reshape(n, hkv, d), cos, sin))


@pytest.mark.parametrize("n", [1, 6, 17])
def test_silu_mul_of_the_fused_projection_matches_torch(n):
    """silu(gate) * up over the fused gate/up output, to a few ulp (exp by polynomial), across
    the saturating ranges (large |gate| both ways)."""
    inter = 1536
    g = torch.Generator().manual_seed(n)
    gate_up = torch.randn(n, 2 * inter, generator=g) * 4
    gate_up[0, :8] = torch.tensor([-200.0, -90.0, -30.0, -1e-3, 0.0, 1e-3, 30.0, 200.0])
    gate, up = gate_up.chunk(2, dim=-1)
    ref = torch.nn.functional.silu(gate) * up
    got = decoder_cpu.silu_mul(gate_up)
    torch.testing.assert_close(got, ref, rtol=2e-6, atol=1e-30)


def test_bad_inputs_are_refused():
    w = torch.ones(60)
    with pytest.raises(RuntimeError, match="multiple of 8"):
        decoder_cpu.rms_norm(torch.randn(2, 60), w, 1e-5)
    with pytest.raises(RuntimeError, match="heads"):
        decoder_cpu.rope_qkv(torch.randn(2, 100), torch.ones(2, 64), torch.ones(2, 64), 9, 3)


def test_real_model_layers_run_the_fused_ops(smol_loaded):
    """The default CPU load switches every layer to the fused path (the HF parity tests then
    check its output), and a layer's fused forward equals the torch forward to rounding."""
    model = smol_loaded.model
    assert all(layer.fused and layer.input_layernorm.fused and layer.post_attention_layernorm.fused
               for layer in model.layers)
    layer = model.layers[3]

    class NoCacheAttention:  # attention over the step's own keys only (no KV cache involved)
        def forward(self, q, k, v, cache):
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
            out = torch.nn.functional.scaled_dot_product_attention(
                q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True)
            return out.transpose(0, 1)

    n = 6
    x = torch.randn(n, model.cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    rope = model.rotary.lookup(torch.arange(n), x.dtype)
    with torch.inference_mode():
        fused = layer(x, rope, NoCacheAttention(), None)
        layer.set_fused(False)
        try:
            plain = layer(x, rope, NoCacheAttention(), None)
        finally:
            layer.set_fused(True)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5 * float(plain.abs().max()))
