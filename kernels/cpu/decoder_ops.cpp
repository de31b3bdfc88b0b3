// Fused fp32 elementwise ops of the decoder layer on CPU (AVX2), torch custom ops.
//
// At one decode row a layer's arithmetic outside the linears is a few thousand
// flops, but in torch it is ~25 ops of ~5 us dispatch each (RMSNorm alone is
// pow, mean = sum + div, add, rsqrt, mul, mul): at 30 layers that is most of a
// batch-1 step's time outside the linears. These ops do the same math in one
// pass each.
//
// Numerics (built with -ffp-contract=off, nothing fused into FMAs):
//   rope_qkv: rotate-half RoPE, out = x * cos + rotate_half(x) * sin with the same
//     two products and one sum per element as torch: bit-identical to it.
//   silu_mul: g / (1 + e^-g) * u, e^-g to a few ulp (strix::exp8) where torch uses Sleef.
//   rms_norm / add_rms_norm: w * (x * (1 / sqrt(mean(x^2) + eps))), as HF's RMSNorm;
//     the sum of squares runs in 8 lanes then a horizontal sum, so it differs from
//     torch's reduction by summation order only.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <tuple>

#include "ggml_blocks.h"

namespace {

// out[d] = w * (x * inv_rms(x)) for one row (d % 8 == 0 checked by the caller).
void norm_row(const float* x, const float* w, int64_t d, float eps, float* out) {
  __m256 acc = _mm256_setzero_ps();
  for (int64_t i = 0; i < d; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    acc = _mm256_add_ps(acc, _mm256_mul_ps(v, v));
  }
  const float mean = strix::hsum(acc) / static_cast<float>(d);
  const __m256 r = _mm256_set1_ps(1.0f / std::sqrt(mean + eps));
  for (int64_t i = 0; i < d; i += 8) {
    const __m256 v = _mm256_mul_ps(_mm256_loadu_ps(x + i), r);
    _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_loadu_ps(w + i), v));
  }
}

void check_rows(const torch::Tensor& x, const torch::Tensor& w) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat && x.dim() == 2 && x.is_contiguous(), "x: contiguous fp32 [n, d]");
  TORCH_CHECK(w.scalar_type() == torch::kFloat && w.dim() == 1 && w.is_contiguous() && w.size(0) == x.size(1),
              "weight: contiguous fp32 [d]");
  TORCH_CHECK(x.size(1) % 8 == 0, "d must be a multiple of 8, got ", x.size(1));
}

constexpr int64_t kRowGrain = 16;  // rows per task: one row is far below a thread hand-off

torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& w, double eps) {
  check_rows(x, w);
  const int64_t n = x.size(0), d = x.size(1);
  torch::Tensor out = torch::empty_like(x);
  const float *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, n, kRowGrain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) norm_row(xp + r * d, wp, d, static_cast<float>(eps), op + r * d);
  });
  return out;
}

// (s = x + r, rms_norm(s)): the residual add and the next norm in one pass.
std::tuple<torch::Tensor, torch::Tensor> add_rms_norm(const torch::Tensor& x, const torch::Tensor& r,
                                                      const torch::Tensor& w, double eps) {
  check_rows(x, w);
  TORCH_CHECK(r.sizes() == x.sizes() && r.scalar_type() == torch::kFloat && r.is_contiguous(), "residual: like x");
  const int64_t n = x.size(0), d = x.size(1);
  torch::Tensor sum = torch::empty_like(x), out = torch::empty_like(x);
  const float *xp = x.data_ptr<float>(), *rp = r.data_ptr<float>(), *wp = w.data_ptr<float>();
  float *sp = sum.data_ptr<float>(), *op = out.data_ptr<float>();
  at::parallel_for(0, n, kRowGrain, [&](int64_t r0, int64_t r1) {
    for (int64_t row = r0; row < r1; ++row) {
      const int64_t o = row * d;
      for (int64_t i = 0; i < d; i += 8)
        _mm256_storeu_ps(sp + o + i, _mm256_add_ps(_mm256_loadu_ps(xp + o + i), _mm256_loadu_ps(rp + o + i)));
      norm_row(sp + o, wp, d, static_cast<float>(eps), op + o);
    }
  });
  return {sum, out};
}

// One head: out[j] = x[j] * cos[j] - x[j + h] * sin[j], out[j + h] = x[j + h] * cos[j + h] + x[j] * sin[j + h].
inline void rope_head(const float* x, const float* c, const float* s, int64_t half, float* out) {
  for (int64_t j = 0; j < half; j += 8) {
    const __m256 lo = _mm256_loadu_ps(x + j), hi = _mm256_loadu_ps(x + half + j);
    _mm256_storeu_ps(out + j, _mm256_sub_ps(_mm256_mul_ps(lo, _mm256_loadu_ps(c + j)),
                                            _mm256_mul_ps(hi, _mm256_loadu_ps(s + j))));
    _mm256_storeu_ps(out + half + j, _mm256_add_ps(_mm256_mul_ps(hi, _mm256_loadu_ps(c + half + j)),
                                                   _mm256_mul_ps(lo, _mm256_loadu_ps(s + half + j))));
  }
}

// qkv [n, (hq + 2 hkv) * d] (the fused projection's output), cos/sin [n, d] ->
// (q [n, hq, d], k [n, hkv, d]) rotated; v stays a view of qkv.
std::tuple<torch::Tensor, torch::Tensor> rope_qkv(const torch::Tensor& qkv, const torch::Tensor& cos,
                                                  const torch::Tensor& sin, int64_t hq, int64_t hkv) {
  TORCH_CHECK(qkv.scalar_type() == torch::kFloat && qkv.dim() == 2 && qkv.is_contiguous(), "qkv: contiguous fp32 [n, w]");
  const int64_t n = qkv.size(0), w = qkv.size(1);
  TORCH_CHECK(hq > 0 && hkv > 0 && w % (hq + 2 * hkv) == 0, "qkv width ", w, " is not (hq + 2 hkv) heads");
  const int64_t d = w / (hq + 2 * hkv), half = d / 2;
  TORCH_CHECK(d % 16 == 0, "head_dim must be a multiple of 16, got ", d);
  for (const auto* t : {&cos, &sin})
    TORCH_CHECK(t->scalar_type() == torch::kFloat && t->is_contiguous() && t->numel() == n * d, "cos/sin: fp32 [n, head_dim]");
  torch::Tensor q = torch::empty({n, hq, d}, qkv.options()), k = torch::empty({n, hkv, d}, qkv.options());
  const float *xp = qkv.data_ptr<float>(), *cp = cos.data_ptr<float>(), *sp = sin.data_ptr<float>();
  float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>();
  at::parallel_for(0, n, kRowGrain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float *row = xp + r * w, *c = cp + r * d, *s = sp + r * d;
      for (int64_t h = 0; h < hq; ++h) rope_head(row + h * d, c, s, half, qp + (r * hq + h) * d);
      for (int64_t h = 0; h < hkv; ++h) rope_head(row + (hq + h) * d, c, s, half, kp + (r * hkv + h) * d);
    }
  });
  return {q, k};
}

// gate_up [n, 2 I] (the fused gate/up projection's output) -> silu(gate) * up [n, I], with
// silu(g) = g / (1 + e^-g) as torch computes it (e^-g by strix::exp8, to a few ulp).
torch::Tensor silu_mul(const torch::Tensor& gate_up) {
  TORCH_CHECK(gate_up.scalar_type() == torch::kFloat && gate_up.dim() == 2 && gate_up.is_contiguous(),
              "gate_up: contiguous fp32 [n, 2 I]");
  const int64_t n = gate_up.size(0), inter = gate_up.size(1) / 2;
  TORCH_CHECK(gate_up.size(1) == 2 * inter && inter % 8 == 0, "intermediate size must be a multiple of 8");
  torch::Tensor out = torch::empty({n, inter}, gate_up.options());
  const float* gp = gate_up.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const __m256 one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps();
  at::parallel_for(0, n, 4, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float *g = gp + r * 2 * inter, *u = g + inter;
      for (int64_t i = 0; i < inter; i += 8) {
        const __m256 gv = _mm256_loadu_ps(g + i);
        const __m256 silu = _mm256_div_ps(gv, _mm256_add_ps(one, strix::exp8(_mm256_sub_ps(zero, gv))));
        _mm256_storeu_ps(op + r * inter + i, _mm256_mul_ps(silu, _mm256_loadu_ps(u + i)));
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(strix_cpu, m) {
  m.def("rms_norm(Tensor x, Tensor w, float eps) -> Tensor");
  m.def("add_rms_norm(Tensor x, Tensor r, Tensor w, float eps) -> (Tensor, Tensor)");
  m.def("rope_qkv(Tensor qkv, Tensor cos, Tensor sin, int hq, int hkv) -> (Tensor, Tensor)");
  m.def("silu_mul(Tensor gate_up) -> Tensor");
}

TORCH_LIBRARY_IMPL(strix_cpu, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("add_rms_norm", &add_rms_norm);
  m.impl("rope_qkv", &rope_qkv);
  m.impl("silu_mul", &silu_mul);
}
