// Opt-in q8 activations for one-row GGUF linears (`--cpu-activation-quant q8`), AVX2, and
// AVX-512 VNNI where the CPU has it (two blocks per vpdpbusd; off with the AVX-512 switch).
//
// The activation row is quantized per block of 32 as llama.cpp's Q8_0 does
// (d = max|x| / 127, q = round-to-nearest-even(x * 127 / max|x|), d kept in fp32)
// and every weight block meets it in integer dot products:
//   Q8_0: d_w d_x * sum(w_q q)                               (signed x signed: sign trick)
//   Q4_0: d_w d_x * (sum(nib q) - 8 sum(q))
//   Q4_1: d_w d_x * sum(nib q) + m_w d_x * sum(q)
// sum(nib q) is one maddubs (unsigned nibble x signed int8) per block. This is not the
// fp32 result: the activations carry their quantization error (the benchmark prints
// perplexity and top-1 agreement against fp32). Only M = 1 (a batch-1 decode) and
// these formats run here: at M >= 2 the fp32 small-M tiles cost no more uops per
// multiply-add on AVX2 and are exact, so the caller keeps them.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "ggml_blocks.h"
#include "row_split.h"

namespace {

using namespace strix;  // block formats, half_at, hsum, hsum_epi32 (ggml_blocks.h)

// A quantized activation row: q[K] int8, per block d (scale) and d * sum(q).
struct QuantRow {
  std::vector<int8_t> q;
  std::vector<float> d, ds;
};

void quantize_row(const float* x, int64_t K, QuantRow& out) {
  out.q.resize(K);
  out.d.resize(K / 32);
  out.ds.resize(K / 32);
  quantize_q8_row(x, K, out.q.data(), out.d.data(), out.ds.data());
}

}  // namespace

void strix::quantize_q8_row(const float* x, int64_t K, int8_t* q, float* dd, float* dds) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  for (int64_t b = 0; b < K / 32; ++b) {
    __m256 v[4], mx = _mm256_setzero_ps();
    for (int i = 0; i < 4; ++i) {
      v[i] = _mm256_loadu_ps(x + b * 32 + 8 * i);
      mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, v[i]));
    }
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    const float amax = _mm_cvtss_f32(m4);
    const float d = amax / 127.0f, id = amax != 0.0f ? 127.0f / amax : 0.0f;
    __m256i n[4];
    for (int i = 0; i < 4; ++i)
      n[i] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[i], _mm256_set1_ps(id)),
                                                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    const int total = hsum_epi32(_mm256_add_epi32(_mm256_add_epi32(n[0], n[1]), _mm256_add_epi32(n[2], n[3])));
    // packs interleave 128-bit lanes; the permute restores element order.
    __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(n[0], n[1]), _mm256_packs_epi32(n[2], n[3]));
    p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + b * 32), p);
    dd[b] = d;
    dds[b] = d * static_cast<float>(total);
  }
}

namespace {

// A Q4 block's 16 bytes -> 32 nibbles in element order (low nibbles first).
inline __m256i nibble_bytes(const uint8_t* qs) {
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
  const __m128i mask = _mm_set1_epi8(0x0F);
  return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(bytes, 4), mask), _mm_and_si128(bytes, mask));
}

// 8 int32 partial sums of 32 products u8 x s8.
inline __m256i dot_u8s8(__m256i u, __m256i s) {
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
}

// R weight rows against the quantized row over blocks [b0, b1): y[r] = dot(w row r, x).
template <int64_t TYPE, int R>
inline void gemv_q8_rows(const QuantRow& x, const uint8_t* w, int64_t rb, int64_t b0, int64_t b1, float* y) {
  constexpr int64_t bb = block_bytes(TYPE);
  __m256 acc[R];
  float corr[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps(), corr[r] = 0.0f;
  for (int64_t b = b0; b < b1; ++b) {
    const __m256i xq = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.q.data() + b * 32));
    const float dx = x.d[b];
    for (int r = 0; r < R; ++r) {
      const uint8_t* p = w + r * rb + b * bb;
      prefetch_ahead(p);
      const float dw = half_at(p);
      __m256i dot;
      if (TYPE == kQ8_0) {
        const __m256i wq = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 2));
        dot = dot_u8s8(_mm256_sign_epi8(wq, wq), _mm256_sign_epi8(xq, wq));
      } else {
        dot = dot_u8s8(nibble_bytes(p + (TYPE == kQ4_0 ? 2 : 4)), xq);
        corr[r] += TYPE == kQ4_0 ? -8.0f * dw * x.ds[b] : half_at(p + 2) * x.ds[b];
      }
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(dw * dx), acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) y[r] = hsum(acc[r]) + corr[r];
}

// ---- AVX-512 VNNI variant (runtime dispatch): two blocks per zmm, one vpdpbusd each ------------
#define STRIX_VNNI __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,avx2,fma,f16c")))

// VNNI on top of the AVX-512 set `avx512_on()` already requires (F/DQ/VL/BW).
const bool vnni_cpu = __builtin_cpu_supports("avx512vnni");

// Two weight blocks as the 64 u8 operands of vpdpbusd: Q4 nibbles in element order, Q8_0 + 128.
template <int64_t TYPE>
STRIX_VNNI inline __m512i pair_bytes(const uint8_t* p0, const uint8_t* p1) {
  constexpr int64_t off = TYPE == kQ4_1 ? 4 : 2;  // quants after the fp16 scale (and Q4_1's min)
  if (TYPE == kQ8_0) {
    const __m512i q = _mm512_inserti64x4(
        _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p0 + off))),
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p1 + off)), 1);
    return _mm512_xor_si512(q, _mm512_set1_epi8(static_cast<char>(0x80)));
  }
  return _mm512_inserti64x4(_mm512_castsi256_si512(nibble_bytes(p0 + off)), nibble_bytes(p1 + off), 1);
}

STRIX_VNNI inline __m512 pair_scale(float a, float b) {
  return _mm512_insertf32x8(_mm512_set1_ps(a), _mm256_set1_ps(b), 1);
}

// gemv_q8_rows with two blocks per instruction: the same integer dots (Q8_0 as (w + 128) q,
// less 128 sum(q) in the scalar correction), so the same result up to fp32 summation order.
template <int64_t TYPE, int R>
STRIX_VNNI void gemv_q8_rows_vnni(const QuantRow& x, const uint8_t* w, int64_t rb, int64_t nb, float* y) {
  constexpr int64_t bb = block_bytes(TYPE);
  __m512 acc[R];
  float corr[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps(), corr[r] = 0.0f;
  for (int64_t b = 0; b + 1 < nb; b += 2) {
    const __m512i xq = _mm512_loadu_si512(x.q.data() + b * 32);
    const __m512 dx = pair_scale(x.d[b], x.d[b + 1]);
    for (int r = 0; r < R; ++r) {
      const uint8_t* p = w + r * rb + b * bb;
      prefetch_ahead(p);
      const float d0 = half_at(p), d1 = half_at(p + bb);
      const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), pair_bytes<TYPE>(p, p + bb), xq);
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(pair_scale(d0, d1), dx), acc[r]);
      if (TYPE == kQ4_1) corr[r] += half_at(p + 2) * x.ds[b] + half_at(p + bb + 2) * x.ds[b + 1];
      else corr[r] -= (TYPE == kQ4_0 ? 8.0f : 128.0f) * (d0 * x.ds[b] + d1 * x.ds[b + 1]);
    }
  }
  for (int r = 0; r < R; ++r) y[r] = _mm512_reduce_add_ps(acc[r]) + corr[r];
  if (nb % 2) {  // the odd last block on the 8-lane path
    float tail[R];
    gemv_q8_rows<TYPE, R>(x, w, rb, nb - 1, nb, tail);
    for (int r = 0; r < R; ++r) y[r] += tail[r];
  }
}

template <int64_t TYPE>
void gemv_q8(const QuantRow& x, const uint8_t* w, int64_t N, int64_t K, float* y) {
  const int64_t nb = K / 32, rb = row_bytes(TYPE, K);
  if (vnni_cpu && avx512_on()) {
    for_row_quads(N, [&](int64_t n) { gemv_q8_rows_vnni<TYPE, 4>(x, w + n * rb, rb, nb, y + n); },
                  [&](int64_t j) { gemv_q8_rows_vnni<TYPE, 1>(x, w + j * rb, rb, nb, y + j); });
    return;
  }
  for_row_quads(N, [&](int64_t n) { gemv_q8_rows<TYPE, 4>(x, w + n * rb, rb, 0, nb, y + n); },
                [&](int64_t j) { gemv_q8_rows<TYPE, 1>(x, w + j * rb, rb, 0, nb, y + j); });
}

torch::Tensor gguf_linear_q8(const torch::Tensor& x, const torch::Tensor& w, int64_t type, int64_t N) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat && x.dim() == 2 && x.size(0) == 1 && x.is_contiguous(),
              "x: contiguous fp32 [1, K] (q8 activations run one row)");
  TORCH_CHECK(type == kQ8_0 || type == kQ4_0 || type == kQ4_1, "q8 activations: Q4_0, Q4_1 or Q8_0 weights, got ", type);
  const int64_t K = x.size(1);
  TORCH_CHECK(K % 32 == 0, "K must be a multiple of 32, got ", K);
  TORCH_CHECK(w.scalar_type() == torch::kUInt8 && w.dim() == 2 && w.is_contiguous() && w.size(0) == N &&
              w.size(1) == row_bytes(type, K), "weight shape ", w.sizes(), " does not hold ", N, " rows of ", K, " weights");
  thread_local QuantRow row;  // the caller's thread quantizes; workers only read it
  quantize_row(x.data_ptr<float>(), K, row);
  torch::Tensor y = torch::empty({1, N}, x.options());
  const uint8_t* wp = w.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();
  if (type == kQ8_0) gemv_q8<kQ8_0>(row, wp, N, K, yp);
  else if (type == kQ4_0) gemv_q8<kQ4_0>(row, wp, N, K, yp);
  else gemv_q8<kQ4_1>(row, wp, N, K, yp);
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(strix_gguf, m) {
  m.def("linear_q8(Tensor x, Tensor w, int qtype, int n) -> Tensor");
}

TORCH_LIBRARY_IMPL(strix_gguf, CPU, m) {
  m.impl("linear_q8", &gguf_linear_q8);
}
