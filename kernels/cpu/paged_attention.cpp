// Paged attention on CPU (fp32, AVX2 + FMA) for short query runs: decodes and speculative
// verification rows, straight from the KV pages, with the step's K/V write in the same op.
//
// Cache layout per layer (engine/attention/base.py): [num_blocks, 2, page, hkv, d]; the K of
// (block b, offset o) starts at ((2b) * page + o) * hkv * d, its V one page later.
// Causality is aligned to the end of the request's KV: query t of a request with q_len queries
// and kv_len keys sees keys 0 .. kv_len - q_len + t.
//
// Work item = (request row, KV head, first query token of a tile): its rows are the tile's
// query tokens x the g query heads of that KV head (at most kMaxRows), so every key loaded is
// used by all g heads. Keys stream in blocks of 8 through an online softmax (running max m,
// running sum l, unnormalised output acc per row), so nothing is gathered or padded.
//
// Numerics: scores q.k * scale summed in 8 lanes per key then a transposing horizontal add,
// exp by a degree-5 polynomial after range reduction (relative error < 3e-7), fp32 throughout:
// equal to softmax attention up to summation order and that exp's rounding.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "ggml_blocks.h"

namespace {

constexpr int64_t kMaxRows = 32;  // rows per work item (query tokens x heads of one KV head)
constexpr int64_t kMaxHeadDim = 256;
constexpr int64_t kKeys = 8;  // keys per online-softmax block (one AVX2 vector of scores)

inline float hmax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

// Lane k = sum of the 8 lanes of a[k]: three rounds of pairwise horizontal adds.
inline __m256 transpose_sum(const __m256* a) {
  const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

struct Problem {
  float* out;  // [T, hq, d]
  const float* q;  // [T, hq, d] (rows of q_stride floats)
  const float* cache;  // one layer's pages
  const int32_t *qo, *kv_ptr, *pages, *kv_lens;
  int64_t q_stride, page, hkv, g, d, q_tile;
  float scale;
};

// Online-softmax state of one work item's rows.
struct Rows {
  alignas(32) float q[kMaxRows * kMaxHeadDim];  // scaled queries
  alignas(32) float acc[kMaxRows * kMaxHeadDim];  // unnormalised outputs
  float m[kMaxRows], l[kMaxRows];
};

// One row against keys k[0 .. nvis) of a block (lanes >= nvis are masked): updates m, l, acc.
inline void row_block(const Problem& P, Rows& s, int64_t i, const float* const* k, const float* const* v,
                      int64_t nvis) {
  const int64_t d = P.d;
  const float* qr = s.q + i * d;
  __m256 a[kKeys];
  for (int64_t j = 0; j < kKeys; ++j) a[j] = _mm256_setzero_ps();
  for (int64_t c = 0; c < d; c += 8) {
    const __m256 qv = _mm256_load_ps(qr + c);
    for (int64_t j = 0; j < kKeys; ++j) a[j] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k[j] + c), a[j]);
  }
  const __m256 lane = _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256 valid = _mm256_cmp_ps(lane, _mm256_set1_ps(static_cast<float>(nvis)), _CMP_LT_OQ);
  const __m256 scores = _mm256_blendv_ps(_mm256_set1_ps(-std::numeric_limits<float>::infinity()),
                                         transpose_sum(a), valid);
  const float m_new = std::max(s.m[i], hmax(scores));
  const float corr = std::exp(s.m[i] - m_new);  // 0 for the first block (m = -inf)
  const __m256 p = _mm256_and_ps(strix::exp8(_mm256_sub_ps(scores, _mm256_set1_ps(m_new))), valid);
  s.m[i] = m_new;
  s.l[i] = s.l[i] * corr + strix::hsum(p);
  alignas(32) float pw[kKeys];
  _mm256_store_ps(pw, p);
  float* acc = s.acc + i * d;
  const __m256 cv = _mm256_set1_ps(corr);
  for (int64_t c = 0; c < d; c += 8) {
    __m256 o = _mm256_mul_ps(_mm256_load_ps(acc + c), cv);
    for (int64_t j = 0; j < nvis; ++j) o = _mm256_fmadd_ps(_mm256_set1_ps(pw[j]), _mm256_loadu_ps(v[j] + c), o);
    _mm256_store_ps(acc + c, o);
  }
}

void attend_item(const Problem& P, int64_t r, int64_t h, int64_t t0) {
  const int64_t q_len = P.qo[r + 1] - P.qo[r], kv_len = P.kv_lens[r], first = kv_len - q_len;
  const int64_t t1 = std::min(t0 + P.q_tile, q_len), d = P.d, hq = P.hkv * P.g;
  const int64_t rows = (t1 - t0) * P.g, keys = first + t1;  // keys [0, keys) are seen by some row
  Rows s;
  for (int64_t i = 0; i < rows; ++i) {  // row i: query token t0 + i / g, head h * g + i % g
    const float* src = P.q + (P.qo[r] + t0 + i / P.g) * P.q_stride + (h * P.g + i % P.g) * d;
    for (int64_t c = 0; c < d; ++c) s.q[i * d + c] = src[c] * P.scale;
    std::memset(s.acc + i * d, 0, d * sizeof(float));
    s.m[i] = -std::numeric_limits<float>::infinity();
    s.l[i] = 0.0f;
  }
  const int32_t* pages = P.pages + P.kv_ptr[r];
  const int64_t row_floats = P.hkv * d, v_offset = P.page * row_floats;
  for (int64_t k0 = 0; k0 < keys; k0 += kKeys) {
    const int64_t nk = std::min(kKeys, keys - k0);
    const float *k[kKeys], *v[kKeys];
    for (int64_t j = 0; j < kKeys; ++j) {  // lanes past the last key reuse key k0 (masked)
      const int64_t pos = k0 + (j < nk ? j : 0);
      const int64_t row = static_cast<int64_t>(pages[pos / P.page]) * 2 * P.page + pos % P.page;
      k[j] = P.cache + row * row_floats + h * d;
      v[j] = k[j] + v_offset;
    }
    for (int64_t i = 0; i < rows; ++i) {
      const int64_t nvis = std::min(nk, first + t0 + i / P.g - k0 + 1);  // causal
      if (nvis > 0) row_block(P, s, i, k, v, nvis);
    }
  }
  for (int64_t i = 0; i < rows; ++i) {
    float* dst = P.out + ((P.qo[r] + t0 + i / P.g) * hq + h * P.g + i % P.g) * d;
    const float inv = 1.0f / s.l[i];
    for (int64_t c = 0; c < d; ++c) dst[c] = s.acc[i * d + c] * inv;
  }
}

// k/v [T, hkv, d] (token stride given) -> the cache at slots[t] (page * page_size + offset).
void write_kv(float* cache, const torch::Tensor& k, const torch::Tensor& v, const torch::Tensor& slots,
              int64_t page, int64_t row_floats) {
  const int64_t* sp = slots.data_ptr<int64_t>();
  const float *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  for (int64_t t = 0; t < slots.size(0); ++t) {
    const int64_t row = (sp[t] / page) * 2 * page + sp[t] % page;
    std::memcpy(cache + row * row_floats, kp + t * k.stride(0), row_floats * sizeof(float));
    std::memcpy(cache + (row + page) * row_floats, vp + t * v.stride(0), row_floats * sizeof(float));
  }
}

void check_heads(const torch::Tensor& t, const char* name, int64_t heads, int64_t d) {
  TORCH_CHECK(t.scalar_type() == torch::kFloat && t.dim() == 3 && t.size(1) == heads && t.size(2) == d &&
                  t.stride(2) == 1 && t.stride(1) == d,
              name, ": fp32 [T, ", heads, ", ", d, "] with contiguous heads");
}

// Writes k/v at `slots`, then attends the query tiles listed in `items` ([n, 3] int32:
// request row, KV head, first query token; tiles of q_tile tokens) into `out`.
void paged_attention(torch::Tensor out, const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                     torch::Tensor cache, const torch::Tensor& slots, const torch::Tensor& items,
                     const torch::Tensor& qo, const torch::Tensor& kv_ptr, const torch::Tensor& pages,
                     const torch::Tensor& kv_lens, double scale, int64_t q_tile) {
  TORCH_CHECK(cache.scalar_type() == torch::kFloat && cache.dim() == 5 && cache.size(1) == 2 && cache.is_contiguous(),
              "kv_cache: contiguous fp32 [blocks, 2, page, hkv, d]");
  const int64_t page = cache.size(2), hkv = cache.size(3), d = cache.size(4), hq = q.size(1);
  TORCH_CHECK(d % 8 == 0 && d <= kMaxHeadDim && hq % hkv == 0, "head_dim ", d, " / heads ", hq, ":", hkv);
  check_heads(q, "q", hq, d);
  check_heads(k, "k", hkv, d);
  check_heads(v, "v", hkv, d);
  TORCH_CHECK(out.is_contiguous() && out.sizes() == q.sizes() && out.scalar_type() == torch::kFloat, "out: like q");
  TORCH_CHECK(slots.scalar_type() == torch::kLong && slots.size(0) == k.size(0), "slots: int64 [T]");
  TORCH_CHECK(items.scalar_type() == torch::kInt && items.dim() == 2 && items.size(1) == 3 && items.is_contiguous(),
              "items: int32 [n, 3]");
  for (const auto* t : {&qo, &kv_ptr, &pages, &kv_lens})
    TORCH_CHECK(t->scalar_type() == torch::kInt && t->is_contiguous(), "layout tensors: contiguous int32");
  const int64_t g = hq / hkv;
  TORCH_CHECK(q_tile >= 1 && q_tile * g <= kMaxRows, "q_tile x heads per KV head must be <= ", kMaxRows);
  float* cp = cache.data_ptr<float>();
  write_kv(cp, k, v, slots, page, hkv * d);
  const Problem P{out.data_ptr<float>(), q.data_ptr<float>(), cp, qo.data_ptr<int32_t>(), kv_ptr.data_ptr<int32_t>(),
                  pages.data_ptr<int32_t>(), kv_lens.data_ptr<int32_t>(), q.stride(0), page, hkv, g, d, q_tile,
                  static_cast<float>(scale)};
  const int32_t* it = items.data_ptr<int32_t>();
  at::parallel_for(0, items.size(0), 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) attend_item(P, it[3 * i], it[3 * i + 1], it[3 * i + 2]);
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(strix_cpu, m) {
  m.def("paged_attention(Tensor(a!) out, Tensor q, Tensor k, Tensor v, Tensor(b!) kv_cache, Tensor slots, "
        "Tensor items, Tensor qo_indptr, Tensor kv_indptr, Tensor kv_indices, Tensor kv_lens, float scale, "
        "int q_tile) -> ()");
}

TORCH_LIBRARY_IMPL(strix_cpu, CPU, m) { m.impl("paged_attention", &paged_attention); }
