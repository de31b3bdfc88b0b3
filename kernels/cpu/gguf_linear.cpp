// GGUF block-quantized linears and embedding lookups on CPU (AVX2 + FMA + F16C).
//
// y[M, N] = x[M, K] @ W^T with W [N, K] kept in its ggml block format: rows of
// K / block_weights blocks, `row_bytes` bytes per row. Activations and
// accumulation are fp32, so y is the fp32 matmul over the dequantized weights
// up to summation order. Dequantization is exactly gguf-py's (fp16 scales to
// fp32, then d * q, d * (q - 8) or d * q + m, each rounded as numpy rounds it; an
// explicit FMA only where the product is exact, see group_values; built with
// -ffp-contract=off so the compiler fuses nothing else).
//
// Block layouts. Legacy formats hold 32 weights per block:
//   Q8_0 (type 8): fp16 d, int8 q[32]                 34 bytes, w = d * q
//   Q4_0 (type 2): fp16 d, uint8 qs[16]               18 bytes, w = d * (nib - 8)
//   Q4_1 (type 3): fp16 d, fp16 m, uint8 qs[16]       20 bytes, w = d * nib + m
// where element j < 16 is the low nibble of qs[j] and element j + 16 its high nibble.
// K-quants hold 256 weights per super-block, in 8 groups of 32:
//   Q4_K (type 12): fp16 d, fp16 dmin, 6-bit scales/mins[12], uint8 qs[128]   144 bytes,
//       w = (d * sc[g]) * nib - dmin * mn[g]; group g takes the low (g even) or high
//       nibbles of qs[32 * (g / 2) ...].
//   Q6_K (type 14): uint8 ql[128], uint8 qh[64], int8 sc[16], fp16 d       210 bytes,
//       w = (d * sc[e / 16]) * (q - 32), q = 4 bits of ql | 2 bits of qh << 4.
// Every kernel walks a row in groups of 32 weights (`group_values`).
//
// M = 1 (one decode): each weight block is dequantized into registers and used at
// once, 4 weight rows per pass over the activation row (no fp32 weight buffer).
// Small M (batched decode, verification: M <= kSmallM): output rows are split across
// threads in tiles of kTile; each tile's weights are dequantized once into a
// thread-local buffer (no allocation after the first call, L1/L2-resident) and
// reused by every one of the M activation rows through 3 x 4 register tiles.
// Larger M (prefill) runs as chunks of at most kSmallM rows of the same. On CPUs with AVX-512 the GEMV and the small-M tiles run on 16
// lanes (runtime dispatch, same dequantization); otherwise on AVX2's 8.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "ggml_blocks.h"
#include "row_split.h"

namespace {

using namespace strix;  // block formats, half_at, hsum (ggml_blocks.h)

constexpr int64_t kTile = 8, kSmallM = 64;

// 16 bytes of nibbles -> the block's 32 values as floats, in element order (element j < 16 is
// the low nibble of byte j, element j + 16 its high nibble): each 8 bytes widened to 8 lanes
// once, then masked (low) or shifted (high).
inline void nibbles(const uint8_t* qs, __m256 out[4]) {
  const __m256i mask = _mm256_set1_epi32(0x0F);
  for (int h = 0; h < 2; ++h) {
    const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(qs + 8 * h)));
    out[h] = _mm256_cvtepi32_ps(_mm256_and_si256(b, mask));
    out[2 + h] = _mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4));
  }
}

// 32 bytes -> 4 x 8 floats, in byte order (signed bytes when SIGNED).
template <bool SIGNED = false>
inline void bytes_values(__m256i q, __m256 out[4]) {
  const __m128i lo = _mm256_castsi256_si128(q), hi = _mm256_extracti128_si256(q, 1);
  const __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
  for (int i = 0; i < 4; ++i)
    out[i] = _mm256_cvtepi32_ps(SIGNED ? _mm256_cvtepi8_epi32(parts[i]) : _mm256_cvtepu8_epi32(parts[i]));
}

inline __m256i bits(const uint8_t* p, int shift, int mask) {
  const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm256_and_si256(_mm256_srl_epi16(q, _mm_cvtsi32_si128(shift)), _mm256_set1_epi8(static_cast<char>(mask)));
}

// Q4_K's 6-bit scale and min of group j (0..7) from the 12 packed bytes.
inline void q4k_scale_min(const uint8_t* s, int j, int* sc, int* mn) {
  if (j < 4) {
    *sc = s[j] & 63;
    *mn = s[j + 4] & 63;
  } else {
    *sc = (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4);
    *mn = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
  }
}

// Group g (32 weights) of a row as 4 x 8 floats, gguf-py's dequantization; the only place it
// is written, so the buffered and in-register paths see the same values. gguf-py rounds each
// product and sum once (numpy fp32); here one FMA stands for a product and the sum after it
// where the product is exact in fp32 (then both round once, at the sum): an fp16 scale (11
// significant bits) times a 4-bit quant, or Q4_K's d * sc (17 bits) times a 4-bit quant, needs
// at most 21 bits. So Q4_0: d * (q - 8) = fma(d, q, -8d) (exact, the difference is representable),
// Q4_1: fma(d, q, m), Q4_K: fma(d * sc, q, -(dmin * mn)); Q8_0 and Q6_K products are exact too.
template <int64_t TYPE>
inline void group_values(const uint8_t* row, int64_t g, __m256 v[4]) {
  if (TYPE == kQ4_K) {
    const uint8_t* p = row + (g >> 3) * 144;
    const int j = static_cast<int>(g & 7);
    int sc, mn;
    q4k_scale_min(p + 4, j, &sc, &mn);
    const __m256 d = _mm256_set1_ps(half_at(p) * static_cast<float>(sc));
    const __m256 neg_m = _mm256_set1_ps(-(half_at(p + 2) * static_cast<float>(mn)));
    bytes_values(bits(p + 16 + 32 * (j >> 1), 4 * (j & 1), 0x0F), v);
    for (int i = 0; i < 4; ++i) v[i] = _mm256_fmadd_ps(d, v[i], neg_m);
    return;
  }
  if (TYPE == kQ6_K) {
    const uint8_t* p = row + (g >> 3) * 210;
    const int j = static_cast<int>(g & 7), n = j >> 2, qd = j & 3;
    const __m256i lo = bits(p + 64 * n + 32 * (qd & 1), 4 * (qd >> 1), 0x0F);
    const __m256i hi = bits(p + 128 + 32 * n, 2 * qd, 0x03);
    const __m256i q = _mm256_or_si256(lo, _mm256_slli_epi16(hi, 4));  // 0..63
    bytes_values<true>(_mm256_sub_epi8(q, _mm256_set1_epi8(32)), v);  // q - 32, exact in bytes
    const int8_t* sc = reinterpret_cast<const int8_t*>(p + 192 + 8 * n + 2 * qd);
    const float d = half_at(p + 208);
    const __m256 d0 = _mm256_set1_ps(d * static_cast<float>(sc[0]));
    const __m256 d1 = _mm256_set1_ps(d * static_cast<float>(sc[1]));
    for (int i = 0; i < 4; ++i) v[i] = _mm256_mul_ps(i < 2 ? d0 : d1, v[i]);
    return;
  }
  const uint8_t* p = row + g * block_bytes(TYPE);
  const float dh = half_at(p);
  const __m256 d = _mm256_set1_ps(dh);
  if (TYPE == kQ8_0) {
    for (int i = 0; i < 4; ++i) {
      const __m128i q = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 2 + 8 * i));
      v[i] = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)));
    }
    return;
  }
  nibbles(p + (TYPE == kQ4_0 ? 2 : 4), v);
  const __m256 c = _mm256_set1_ps(TYPE == kQ4_0 ? -8.0f * dh : half_at(p + 2));
  for (int i = 0; i < 4; ++i) v[i] = _mm256_fmadd_ps(d, v[i], c);
}

// Runs the statement (the macro's tail) with the compile-time constant T set to the runtime format `type` (the one
// switch every kernel goes through).
#define STRIX_DISPATCH(type, ...)                                \
  switch (type) {                                                \
    case kQ8_0: { constexpr int64_t T = kQ8_0; __VA_ARGS__; } break;    \
    case kQ4_0: { constexpr int64_t T = kQ4_0; __VA_ARGS__; } break;    \
    case kQ4_1: { constexpr int64_t T = kQ4_1; __VA_ARGS__; } break;    \
    case kQ4_K: { constexpr int64_t T = kQ4_K; __VA_ARGS__; } break;    \
    case kQ6_K: { constexpr int64_t T = kQ6_K; __VA_ARGS__; } break;    \
    default: TORCH_CHECK(false, "unsupported GGUF type ", type); \
  }

// One row of K weights -> fp32 out[K].
template <int64_t TYPE>
void dequant_row(const uint8_t* row, int64_t K, float* out) {
  for (int64_t g = 0; g < K / 32; ++g) {
    prefetch_ahead(row + g * group_bytes(TYPE));
    __m256 v[4];
    group_values<TYPE>(row, g, v);
    for (int i = 0; i < 4; ++i) _mm256_storeu_ps(out + g * 32 + 8 * i, v[i]);
  }
}

// y[r * ldy + c] = dot(x row r, w row c) for an R x C register tile: R * C accumulators,
// each k step loads R activation and C weight vectors for R * C FMAs.
template <int R, int C>
inline void micro(const float* x, int64_t ldx, const float* w, int64_t K, float* y, int64_t ldy) {
  __m256 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; k += 8) {
    __m256 xv[R];
    for (int r = 0; r < R; ++r) xv[r] = _mm256_loadu_ps(x + r * ldx + k);
    for (int c = 0; c < C; ++c) {
      const __m256 wv = _mm256_loadu_ps(w + c * K + k);
      for (int r = 0; r < R; ++r) acc[r][c] = _mm256_fmadd_ps(xv[r], wv, acc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) y[r * ldy + c] = hsum(acc[r][c]);
}

// R weight rows against one activation row, the weights dequantized in registers and
// never stored. Each row's accumulation order is micro<1, C>'s (8 lanes over k, then
// hsum), so the result equals the small-M path bit for bit.
template <int64_t TYPE, int R>
inline void gemv_rows(const float* x, const uint8_t* w, int64_t rb, int64_t K, float* y) {
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < K / 32; ++b) {
    __m256 xv[4];
    for (int g = 0; g < 4; ++g) xv[g] = _mm256_loadu_ps(x + b * 32 + 8 * g);
    for (int r = 0; r < R; ++r) {
      prefetch_ahead(w + r * rb + b * group_bytes(TYPE));
      __m256 v[4];
      group_values<TYPE>(w + r * rb, b, v);
      for (int g = 0; g < 4; ++g) acc[r] = _mm256_fmadd_ps(xv[g], v[g], acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) y[r] = hsum(acc[r]);
}

// ---- AVX-512 variants (runtime dispatch): the same tiles on 16 lanes ----------------------
// Used when the CPU has AVX-512 (F/DQ/VL/BW); `avx512_enabled` can switch them off (tests run
// both). Within one ISA the one-row GEMV and the small-M tiles sum each output in the same
// order (16 lanes over k, then one reduction, sum16x4's), so a row alone equals that row in a batch.
#define STRIX_AVX512 __attribute__((target("avx512f,avx512dq,avx512vl,avx512bw,avx2,fma,f16c")))

bool cpu_has_avx512() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw");
}

bool avx512_enabled = cpu_has_avx512();

// 16 signed bytes -> 16 floats.
STRIX_AVX512 inline __m512 i8_ps(__m128i q) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q)); }
STRIX_AVX512 inline __m128i load16(const uint8_t* p) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)); }

// A Q4_0/Q4_1 block's 16 bytes of nibbles widened to 16 lanes once: the low nibbles and the
// high nibbles as 16 floats each.
STRIX_AVX512 inline void nibbles16(const uint8_t* qs, __m512 v[2]) {
  const __m512i b = _mm512_cvtepu8_epi32(load16(qs));
  v[0] = _mm512_cvtepi32_ps(_mm512_and_si512(b, _mm512_set1_epi32(0x0F)));
  v[1] = _mm512_cvtepi32_ps(_mm512_srli_epi32(b, 4));
}

// group_values on 16 lanes: the same per-element arithmetic (so the same values), 2 x 16 floats.
template <int64_t TYPE>
STRIX_AVX512 inline void group_values16(const uint8_t* row, int64_t g, __m512 v[2]) {
  const int j = static_cast<int>(g & 7);
  if (TYPE == kQ4_K) {
    const uint8_t* p = row + (g >> 3) * 144;
    int sc, mn;
    q4k_scale_min(p + 4, j, &sc, &mn);
    const __m512 d = _mm512_set1_ps(half_at(p) * static_cast<float>(sc));
    const __m512 neg_m = _mm512_set1_ps(-(half_at(p + 2) * static_cast<float>(mn)));
    const uint8_t* qs = p + 16 + 32 * (j >> 1);  // group j: low (j even) or high nibbles of 32 bytes
    for (int h = 0; h < 2; ++h) {
      const __m512i b = _mm512_cvtepu8_epi32(load16(qs + 16 * h));
      const __m512i q = (j & 1) ? _mm512_srli_epi32(b, 4) : _mm512_and_si512(b, _mm512_set1_epi32(0x0F));
      v[h] = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(q), neg_m);
    }
    return;
  }
  if (TYPE == kQ6_K) {
    const uint8_t* p = row + (g >> 3) * 210;
    const int n = j >> 2, qd = j & 3;
    const __m256i lo = bits(p + 64 * n + 32 * (qd & 1), 4 * (qd >> 1), 0x0F);
    const __m256i q = _mm256_sub_epi8(_mm256_or_si256(lo, _mm256_slli_epi16(bits(p + 128 + 32 * n, 2 * qd, 0x03), 4)),
                                      _mm256_set1_epi8(32));  // q - 32 in bytes (exact)
    const int8_t* sc = reinterpret_cast<const int8_t*>(p + 192 + 8 * n + 2 * qd);
    const float d = half_at(p + 208);
    v[0] = _mm512_mul_ps(_mm512_set1_ps(d * static_cast<float>(sc[0])), i8_ps(_mm256_castsi256_si128(q)));
    v[1] = _mm512_mul_ps(_mm512_set1_ps(d * static_cast<float>(sc[1])), i8_ps(_mm256_extracti128_si256(q, 1)));
    return;
  }
  const uint8_t* p = row + g * block_bytes(TYPE);
  const float dh = half_at(p);
  const __m512 d = _mm512_set1_ps(dh);
  if (TYPE == kQ8_0) {
    for (int i = 0; i < 2; ++i) v[i] = _mm512_mul_ps(d, i8_ps(load16(p + 2 + 16 * i)));
    return;
  }
  nibbles16(p + (TYPE == kQ4_0 ? 2 : 4), v);
  const __m512 c = _mm512_set1_ps(TYPE == kQ4_0 ? -8.0f * dh : half_at(p + 2));
  for (int i = 0; i < 2; ++i) v[i] = _mm512_fmadd_ps(d, v[i], c);
}

template <int64_t TYPE>
STRIX_AVX512 void dequant_row16(const uint8_t* row, int64_t K, float* out) {
  for (int64_t g = 0; g < K / 32; ++g) {
    prefetch_ahead(row + g * group_bytes(TYPE));
    __m512 v[2];
    group_values16<TYPE>(row, g, v);
    _mm512_storeu_ps(out + g * 32, v[0]);
    _mm512_storeu_ps(out + g * 32 + 16, v[1]);
  }
}

// Horizontal sums of four 16-lane accumulators in one pass: per 128-bit chunk (l0 + l2) + (l1 + l3),
// then chunks (c0 + c2) + (c1 + c3). Every accumulator is summed in that same order, whatever the
// other three hold, and `sum16` (one accumulator) follows it too, so an output's value does not
// depend on which kernel or tile position computed it.
STRIX_AVX512 inline __m128 sum16x4(__m512 a0, __m512 a1, __m512 a2, __m512 a3) {
  const __m512 s01 = _mm512_add_ps(_mm512_unpacklo_ps(a0, a1), _mm512_unpackhi_ps(a0, a1));
  const __m512 s23 = _mm512_add_ps(_mm512_unpacklo_ps(a2, a3), _mm512_unpackhi_ps(a2, a3));
  const __m512 t = _mm512_add_ps(_mm512_shuffle_ps(s01, s23, 0x44), _mm512_shuffle_ps(s01, s23, 0xEE));
  const __m256 u = _mm256_add_ps(_mm512_castps512_ps256(t), _mm512_extractf32x8_ps(t, 1));
  return _mm_add_ps(_mm256_castps256_ps128(u), _mm256_extractf128_ps(u, 1));
}

STRIX_AVX512 inline float sum16(__m512 a) {
  const __m512 z = _mm512_setzero_ps();
  return _mm_cvtss_f32(sum16x4(a, z, z, z));
}

template <int R, int C>
STRIX_AVX512 inline void micro16(const float* x, int64_t ldx, const float* w, int64_t K, float* y, int64_t ldy) {
  __m512 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 16) {
    __m512 xv[R];
    for (int r = 0; r < R; ++r) xv[r] = _mm512_loadu_ps(x + r * ldx + k);
    for (int c = 0; c < C; ++c) {
      const __m512 wv = _mm512_loadu_ps(w + c * K + k);
      for (int r = 0; r < R; ++r) acc[r][c] = _mm512_fmadd_ps(xv[r], wv, acc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r)
    if constexpr (C == 4) {
      _mm_storeu_ps(y + r * ldy, sum16x4(acc[r][0], acc[r][1], acc[r][2], acc[r][3]));
    } else {
      for (int c = 0; c < C; ++c) y[r * ldy + c] = sum16(acc[r][c]);
    }
}

// The register tiles of one ISA: `run<R, C>` is its R x C micro kernel, kRows the tallest.
struct Avx2Tiles {
  static constexpr int kRows = 3;  // 3 x 4 accumulators + 3 activations + 1 weight = 16 ymm
  template <int R, int C>
  static void run(const float* x, int64_t ldx, const float* w, int64_t K, float* y, int64_t ldy) {
    micro<R, C>(x, ldx, w, K, y, ldy);
  }
};

struct Avx512Tiles {
  static constexpr int kRows = 4;  // 4 x 4 accumulators: 16 of the 32 zmm registers
  template <int R, int C>
  STRIX_AVX512 static void run(const float* x, int64_t ldx, const float* w, int64_t K, float* y, int64_t ldy) {
    micro16<R, C>(x, ldx, w, K, y, ldy);
  }
};

template <class Tiles, int R>
void micro_cols(const float* x, int64_t ldx, const float* w, int64_t K, float* y, int64_t ldy, int64_t cols) {
  int64_t c = 0;
  for (; c + 4 <= cols; c += 4) Tiles::template run<R, 4>(x, ldx, w + c * K, K, y + c, ldy);
  switch (cols - c) {
    case 3: Tiles::template run<R, 3>(x, ldx, w + c * K, K, y + c, ldy); break;
    case 2: Tiles::template run<R, 2>(x, ldx, w + c * K, K, y + c, ldy); break;
    case 1: Tiles::template run<R, 1>(x, ldx, w + c * K, K, y + c, ldy); break;
    default: break;
  }
}

// y[M, cols] (row stride ldy) = x[M, K] @ w[cols, K]^T in the ISA's register tiles.
template <class Tiles>
void tile_gemm(const float* x, int64_t M, const float* w, int64_t K, float* y, int64_t ldy, int64_t cols) {
  constexpr int R = Tiles::kRows;
  int64_t m = 0;
  for (; m + R <= M; m += R) micro_cols<Tiles, R>(x + m * K, K, w, K, y + m * ldy, ldy, cols);
  switch (M - m) {
    case 3: micro_cols<Tiles, 3>(x + m * K, K, w, K, y + m * ldy, ldy, cols); break;
    case 2: micro_cols<Tiles, 2>(x + m * K, K, w, K, y + m * ldy, ldy, cols); break;
    case 1: micro_cols<Tiles, 1>(x + m * K, K, w, K, y + m * ldy, ldy, cols); break;
    default: break;
  }
}

template <int64_t TYPE, int R>
STRIX_AVX512 void gemv_rows16(const float* x, const uint8_t* w, int64_t rb, int64_t K, float* y) {
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < K / 32; ++b) {
    const __m512 x0 = _mm512_loadu_ps(x + b * 32), x1 = _mm512_loadu_ps(x + b * 32 + 16);
    for (int r = 0; r < R; ++r) {
      prefetch_ahead(w + r * rb + b * group_bytes(TYPE));
      __m512 v[2];
      group_values16<TYPE>(w + r * rb, b, v);
      acc[r] = _mm512_fmadd_ps(x0, v[0], acc[r]);
      acc[r] = _mm512_fmadd_ps(x1, v[1], acc[r]);
    }
  }
  if constexpr (R == 4) {
    _mm_storeu_ps(y, sum16x4(acc[0], acc[1], acc[2], acc[3]));
  } else {
    for (int r = 0; r < R; ++r) y[r] = sum16(acc[r]);
  }
}

// M == 1 (a single decode): rows split across threads, 4 rows at a time.
template <int64_t TYPE>
void gemv(const float* x, const uint8_t* w, int64_t N, int64_t K, float* y) {
  const int64_t rb = row_bytes(TYPE, K);
  if (avx512_enabled) {
    for_row_quads(N, [&](int64_t n) { gemv_rows16<TYPE, 4>(x, w + n * rb, rb, K, y + n); },
                  [&](int64_t j) { gemv_rows16<TYPE, 1>(x, w + j * rb, rb, K, y + j); });
  } else {
    for_row_quads(N, [&](int64_t n) { gemv_rows<TYPE, 4>(x, w + n * rb, rb, K, y + n); },
                  [&](int64_t j) { gemv_rows<TYPE, 1>(x, w + j * rb, rb, K, y + j); });
  }
}

void check_weight(const torch::Tensor& w, int64_t type, int64_t rows, int64_t K) {
  TORCH_CHECK(block_bytes(type) > 0, "unsupported GGUF type ", type);
  TORCH_CHECK(K % block_weights(type) == 0, "K must be a multiple of ", block_weights(type), ", got ", K);
  TORCH_CHECK(w.scalar_type() == torch::kUInt8 && w.dim() == 2 && w.is_contiguous(), "weight: contiguous uint8 [N, row_bytes]");
  TORCH_CHECK(w.size(0) == rows && w.size(1) == row_bytes(type, K), "weight shape ", w.sizes(),
              " does not hold ", rows, " rows of ", K, " weights of type ", type);
}

template <int64_t TYPE>
void small_m(const float* x, const uint8_t* w, int64_t M, int64_t N, int64_t K, float* y) {
  const int64_t rb = row_bytes(TYPE, K);
  at::parallel_for(0, (N + kTile - 1) / kTile, 1, [&](int64_t t0, int64_t t1) {
    thread_local std::vector<float> buf;
    buf.resize(kTile * K);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t * kTile, nt = std::min(kTile, N - n0);
      if (avx512_enabled) {
        for (int64_t j = 0; j < nt; ++j) dequant_row16<TYPE>(w + (n0 + j) * rb, K, buf.data() + j * K);
        tile_gemm<Avx512Tiles>(x, M, buf.data(), K, y + n0, N, nt);
      } else {
        for (int64_t j = 0; j < nt; ++j) dequant_row<TYPE>(w + (n0 + j) * rb, K, buf.data() + j * K);
        tile_gemm<Avx2Tiles>(x, M, buf.data(), K, y + n0, N, nt);
      }
    }
  });
}

torch::Tensor gguf_linear(const torch::Tensor& x, const torch::Tensor& w, int64_t type, int64_t N) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat && x.dim() == 2 && x.is_contiguous(), "x: contiguous fp32 [M, K]");
  const int64_t M = x.size(0), K = x.size(1);
  check_weight(w, type, N, K);
  torch::Tensor y = torch::empty({M, N}, x.options());
  const uint8_t* wp = w.data_ptr<uint8_t>();
  if (M == 1) {
    const float* xp = x.data_ptr<float>();
    float* yp = y.data_ptr<float>();
    STRIX_DISPATCH(type, gemv<T>(xp, wp, N, K, yp));
    return y;
  }
  // Any M: near-equal chunks of at most kSmallM rows through the small-M tiles (each chunk
  // dequantizes the weights again, which 64 rows amortize; a row's result does not depend
  // on M). Dequantizing into fp32 tiles for at::mm instead ran 2.2-2.5x slower at M = 68-512.
  const int64_t chunks = (M + kSmallM - 1) / kSmallM, rows = (M + chunks - 1) / chunks;
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  for (int64_t m0 = 0; m0 < M; m0 += rows) {
    const int64_t mc = std::min(rows, M - m0);
    STRIX_DISPATCH(type, small_m<T>(xp + m0 * K, wp, mc, N, K, yp + m0 * N));
  }
  return y;
}

torch::Tensor gguf_embedding(const torch::Tensor& ids, const torch::Tensor& w, int64_t type, int64_t K) {
  TORCH_CHECK(ids.scalar_type() == torch::kLong, "ids: int64");
  const int64_t N = w.size(0);
  check_weight(w, type, N, K);
  torch::Tensor flat = ids.contiguous().view(-1);
  const int64_t n = flat.numel();
  const int64_t* ip = flat.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) TORCH_CHECK(ip[i] >= 0 && ip[i] < N, "token id ", ip[i], " out of range");
  torch::Tensor out = torch::empty({n, K}, torch::dtype(torch::kFloat));
  const int64_t rb = row_bytes(type, K);
  const uint8_t* wp = w.data_ptr<uint8_t>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, n, 16, [&](int64_t i0, int64_t i1) {
    STRIX_DISPATCH(type, for (int64_t i = i0; i < i1; ++i) dequant_row<T>(wp + ip[i] * rb, K, op + i * K));
  });
  return out;
}

// Switch the AVX-512 variants on (where the CPU has them) or off; returns whether they are on.
bool set_avx512(bool on) {
  avx512_enabled = on && cpu_has_avx512();
  return avx512_enabled;
}

}  // namespace

bool strix::avx512_on() { return avx512_enabled; }

TORCH_LIBRARY(strix_gguf, m) {
  m.def("set_avx512(bool on) -> bool", &set_avx512);  // no tensors: a catch-all kernel
  m.def("linear(Tensor x, Tensor w, int qtype, int n) -> Tensor");
  m.def("embedding(Tensor ids, Tensor w, int qtype, int k) -> Tensor");
}

TORCH_LIBRARY_IMPL(strix_gguf, CPU, m) {
  m.impl("linear", &gguf_linear);
  m.impl("embedding", &gguf_embedding);
}
