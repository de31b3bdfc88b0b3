// What every CPU kernel of ours shares: the ggml block formats' ids and sizes, the fp16 scale
// read, the weight prefetch distance, an 8-lane exp and 8-lane horizontal sums (AVX2 + FMA + F16C).
#pragma once
#include <immintrin.h>

#include <cstdint>
#include <cstring>

namespace strix {

constexpr int64_t kQ4_0 = 2, kQ4_1 = 3, kQ8_0 = 8, kQ4_K = 12, kQ6_K = 14;  // ggml type ids

// Bytes of one block (0 for a format without a kernel), the weights it holds, a row's bytes.
constexpr int64_t block_bytes(int64_t type) {
  switch (type) {
    case kQ4_0: return 18;
    case kQ4_1: return 20;
    case kQ8_0: return 34;
    case kQ4_K: return 144;
    case kQ6_K: return 210;
    default: return 0;
  }
}

constexpr int64_t block_weights(int64_t type) { return type == kQ4_K || type == kQ6_K ? 256 : 32; }

constexpr int64_t row_bytes(int64_t type, int64_t K) { return K / block_weights(type) * block_bytes(type); }

// Bytes of a row per group of 32 weights (a K-quant super-block holds 8 groups).
constexpr int64_t group_bytes(int64_t type) { return block_bytes(type) * 32 / block_weights(type); }

// Whether the AVX-512 variants run (CPU support and the `set_avx512` switch; gguf_linear.cpp).
bool avx512_on();

// llama.cpp's Q8_0 quantization of one activation row x[K] (K % 32 == 0, gguf_q8.cpp): per
// block of 32, d = max|x| / 127, q = round-to-nearest-even(x / d); writes q[K], d[K / 32] and
// ds[K / 32] = d * sum(q).
void quantize_q8_row(const float* x, int64_t K, int8_t* q, float* d, float* ds);

// An fp16 scale stored at p (unaligned) as fp32.
inline float half_at(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

// Weights stream from DRAM once per step: each kernel prefetches the bytes this far ahead of
// the group it reads (measured on the default model: the one-row GEMVs of a step 6.0 -> 4.2 ms
// on 2 threads; the hardware prefetcher alone restarts at every small matrix and row quad).
constexpr int64_t kPrefetchBytes = 8192;

inline void prefetch_ahead(const uint8_t* p) {
  _mm_prefetch(reinterpret_cast<const char*>(p + kPrefetchBytes), _MM_HINT_T0);
}

// e^x on 8 lanes (relative error < 3e-7; clamped to [-87, 88]): x = n ln2 + r (two-part ln2), e^r = 1 + r + r^2 P(r), times 2^n.
inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline int hsum_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

}  // namespace strix
