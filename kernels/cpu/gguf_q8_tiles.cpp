// q8 activations for GGUF linears at every M (`--cpu-activation-quant q8`) on AVX-512
// VNNI, over weights repacked once at load so that one vpdpbusd lane is one output row.
//
// Packed layout, per group of 16 output rows g and per 32-weight block b (`group_block_bytes`):
//   d[16] fp16 (the rows' block scales), Q4_1 only: m[16] fp16 (block mins), then the quants:
//   Q4_0/Q4_1: 4 chunks c of 64 bytes; byte 4o+i of chunk c is the original qs[4c+i] of row o,
//              whose low nibble is weight 4c+i and high nibble weight 16+4c+i;
//   Q8_0:      8 chunks j of 64 bytes; byte 4o+i of chunk j is weight 4j+i of row o, + 128 (u8).
// So one chunk (or its low / high nibbles) is the u8 operand of one vpdpbusd whose s8 operand is
// 4 activation bytes broadcast to all 16 lanes: per block and activation row, 8 vpdpbusd give
// 16 outputs' integer dots, then one convert and two FMAs apply the scales:
//   Q4_1: d_w d_x sum(nib q) + m_w d_x sum(q);  Q4_0: d_w d_x (sum(nib q) - 8 sum(q));
//   Q8_0: d_w d_x (sum((w + 128) q) - 128 sum(q)).
// That is ~11 instructions per 512 multiply-adds where the exact fp32 tiles need 32 FMAs.
// A row's result does not depend on M or on the other rows (same operations in the same order).
// Without VNNI the same math runs in portable scalar code (tests; callers keep the fp32 tiles).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cstdint>
#include <cstring>
#include <vector>

#include "ggml_blocks.h"

namespace {

using namespace strix;

constexpr int64_t kGroup = 16;  // output rows per packed group (zmm int32 lanes)

constexpr int64_t quant_bytes(int64_t type) { return type == kQ8_0 ? 512 : 256; }
constexpr int64_t scale_bytes(int64_t type) { return type == kQ4_1 ? 64 : 32; }
constexpr int64_t group_block_bytes(int64_t type) { return scale_bytes(type) + quant_bytes(type); }

void check_type(int64_t type) {
  TORCH_CHECK(type == kQ8_0 || type == kQ4_0 || type == kQ4_1, "q8 tiles: Q4_0, Q4_1 or Q8_0 weights, got ", type);
}

// One original row's block (`src`, block_bytes(type)) into lane o of a packed group block.
void pack_block(int64_t type, const uint8_t* src, int64_t o, uint8_t* dst) {
  std::memcpy(dst + 2 * o, src, 2);                                 // d
  if (type == kQ4_1) std::memcpy(dst + 32 + 2 * o, src + 2, 2);     // m
  uint8_t* q = dst + scale_bytes(type);
  const uint8_t* qs = src + (type == kQ4_1 ? 4 : 2);
  const int chunks = type == kQ8_0 ? 8 : 4;
  for (int c = 0; c < chunks; ++c)
    for (int i = 0; i < 4; ++i)
      q[c * 64 + 4 * o + i] = type == kQ8_0 ? static_cast<uint8_t>(qs[4 * c + i] ^ 0x80) : qs[4 * c + i];
}

// w [N, row_bytes] -> [ceil(N / 16), K / 32, group_block_bytes]; rows past N are zero (scale 0).
torch::Tensor pack_q8_tiles(const torch::Tensor& w, int64_t type, int64_t K) {
  check_type(type);
  TORCH_CHECK(K % 32 == 0 && w.scalar_type() == torch::kUInt8 && w.dim() == 2 && w.is_contiguous() &&
              w.size(1) == row_bytes(type, K), "weight shape ", w.sizes(), " does not hold rows of ", K, " weights");
  const int64_t N = w.size(0), G = (N + kGroup - 1) / kGroup, nb = K / 32, gbb = group_block_bytes(type);
  torch::Tensor out = torch::zeros({G, nb, gbb}, w.options());
  const uint8_t* src = w.data_ptr<uint8_t>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  for (int64_t n = 0; n < N; ++n)
    for (int64_t b = 0; b < nb; ++b)
      pack_block(type, src + n * row_bytes(type, K) + b * block_bytes(type), n % kGroup,
                 dst + ((n / kGroup) * nb + b) * gbb);
  return out;
}

// The quantized activations of M rows: q [M, K], d / ds [M, K / 32] (ds = d * sum(q)).
struct QuantRows {
  std::vector<int8_t> q;
  std::vector<float> d, ds;
  int64_t K = 0;
};

// ---- AVX-512 VNNI ------------------------------------------------------------------------------
#define STRIX_VNNI __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,avx2,fma,f16c")))

const bool vnni_cpu = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
                      __builtin_cpu_supports("avx512vnni");

STRIX_VNNI inline __m512i bcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

// Rows m0..m0+R of group g: y[m][g*16 .. +16] (masked to the n_valid real outputs).
template <int64_t TYPE, int R>
STRIX_VNNI void tile_vnni(const QuantRows& x, const uint8_t* gw, int64_t nb, int64_t m0, float* y,
                          int64_t ldy, __mmask16 valid) {
  constexpr int64_t gbb = group_block_bytes(TYPE), sb = scale_bytes(TYPE);
  const int64_t K = x.K;
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  const __m512i low = _mm512_set1_epi8(0x0F);
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = gw + b * gbb;
    const __m512 dw = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk)));
    __m512i dot[R];
    for (int r = 0; r < R; ++r) dot[r] = _mm512_setzero_si512();
    const int8_t* xq = x.q.data() + m0 * K + b * 32;
    if (TYPE == kQ8_0) {
      for (int j = 0; j < 8; ++j) {
        const __m512i wq = _mm512_loadu_si512(blk + sb + 64 * j);
        for (int r = 0; r < R; ++r) dot[r] = _mm512_dpbusd_epi32(dot[r], wq, bcast4(xq + r * K + 4 * j));
      }
    } else {
      for (int c = 0; c < 4; ++c) {
        const __m512i raw = _mm512_loadu_si512(blk + sb + 64 * c);
        const __m512i lo = _mm512_and_si512(raw, low), hi = _mm512_and_si512(_mm512_srli_epi16(raw, 4), low);
        for (int r = 0; r < R; ++r) {
          dot[r] = _mm512_dpbusd_epi32(dot[r], lo, bcast4(xq + r * K + 4 * c));
          dot[r] = _mm512_dpbusd_epi32(dot[r], hi, bcast4(xq + r * K + 16 + 4 * c));
        }
      }
    }
    __m512 mw = dw;
    if (TYPE == kQ4_1) mw = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 32)));
    const float corr = TYPE == kQ4_1 ? 1.0f : TYPE == kQ4_0 ? -8.0f : -128.0f;
    for (int r = 0; r < R; ++r) {
      const int64_t i = (m0 + r) * (K / 32) + b;
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[r]), _mm512_mul_ps(dw, _mm512_set1_ps(x.d[i])), acc[r]);
      acc[r] = _mm512_fmadd_ps(mw, _mm512_set1_ps(corr * x.ds[i]), acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) _mm512_mask_storeu_ps(y + (m0 + r) * ldy, valid, acc[r]);
}

template <int64_t TYPE>
STRIX_VNNI void group_vnni(const QuantRows& x, const uint8_t* gw, int64_t nb, int64_t M, float* y,
                           int64_t ldy, int64_t n_valid) {
  const __mmask16 valid = static_cast<__mmask16>((1u << n_valid) - 1u);
  constexpr int kTile = 6;  // 6 int32 + 6 fp32 accumulators and the weight registers fit in 32 zmm
  int64_t m = 0;
  for (; m + kTile <= M; m += kTile) tile_vnni<TYPE, kTile>(x, gw, nb, m, y, ldy, valid);
  switch (M - m) {
    case 5: tile_vnni<TYPE, 5>(x, gw, nb, m, y, ldy, valid); break;
    case 4: tile_vnni<TYPE, 4>(x, gw, nb, m, y, ldy, valid); break;
    case 3: tile_vnni<TYPE, 3>(x, gw, nb, m, y, ldy, valid); break;
    case 2: tile_vnni<TYPE, 2>(x, gw, nb, m, y, ldy, valid); break;
    case 1: tile_vnni<TYPE, 1>(x, gw, nb, m, y, ldy, valid); break;
    default: break;
  }
}

// ---- portable scalar: the same integer dots and the same order of the float operations -------
void group_scalar(int64_t type, const QuantRows& x, const uint8_t* gw, int64_t nb, int64_t M, float* y,
                  int64_t ldy, int64_t n_valid) {
  const int64_t gbb = group_block_bytes(type), sb = scale_bytes(type), K = x.K;
  const float corr = type == kQ4_1 ? 1.0f : type == kQ4_0 ? -8.0f : -128.0f;
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t o = 0; o < n_valid; ++o) {
      float acc = 0.0f;
      for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* blk = gw + b * gbb;
        const int8_t* xq = x.q.data() + m * K + b * 32;
        int32_t dot = 0;
        for (int64_t k = 0; k < 32; ++k) {
          const int64_t c = k % 16 / 4, i = k % 4;
          int32_t u;
          if (type == kQ8_0) u = blk[sb + 64 * (k / 4) + 4 * o + i];
          else u = k < 16 ? blk[sb + 64 * c + 4 * o + i] & 0x0F : blk[sb + 64 * c + 4 * o + i] >> 4;
          dot += u * xq[k];
        }
        const float dw = half_at(blk + 2 * o), mw = type == kQ4_1 ? half_at(blk + 32 + 2 * o) : dw;
        const int64_t i = m * (K / 32) + b;
        acc = std::fma(static_cast<float>(dot), dw * x.d[i], acc);
        acc = std::fma(mw, corr * x.ds[i], acc);
      }
      y[m * ldy + o] = acc;
    }
  }
}

template <int64_t TYPE>
void run_groups(const QuantRows& x, const uint8_t* pw, int64_t N, int64_t M, float* y) {
  const int64_t nb = x.K / 32, G = (N + kGroup - 1) / kGroup, gbytes = nb * group_block_bytes(TYPE);
  at::parallel_for(0, G, 1, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t n_valid = std::min<int64_t>(kGroup, N - g * kGroup);
      if (vnni_cpu && avx512_on()) group_vnni<TYPE>(x, pw + g * gbytes, nb, M, y + g * kGroup, N, n_valid);
      else group_scalar(TYPE, x, pw + g * gbytes, nb, M, y + g * kGroup, N, n_valid);
    }
  });
}

torch::Tensor linear_q8_tiles(const torch::Tensor& x, const torch::Tensor& pw, int64_t type, int64_t N) {
  check_type(type);
  TORCH_CHECK(x.scalar_type() == torch::kFloat && x.dim() == 2 && x.is_contiguous(), "x: contiguous fp32 [M, K]");
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(K % 32 == 0, "K must be a multiple of 32, got ", K);
  TORCH_CHECK(pw.scalar_type() == torch::kUInt8 && pw.dim() == 3 && pw.is_contiguous() &&
              pw.size(0) == (N + kGroup - 1) / kGroup && pw.size(1) == K / 32 && pw.size(2) == group_block_bytes(type),
              "packed weight shape ", pw.sizes(), " does not hold ", N, " rows of ", K, " weights");
  thread_local QuantRows rows;  // the caller's thread quantizes; workers only read it
  rows.K = K;
  rows.q.resize(M * K);
  rows.d.resize(M * K / 32);
  rows.ds.resize(M * K / 32);
  const float* xp = x.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m)
    quantize_q8_row(xp + m * K, K, rows.q.data() + m * K, rows.d.data() + m * K / 32, rows.ds.data() + m * K / 32);
  torch::Tensor y = torch::empty({M, N}, x.options());
  const uint8_t* p = pw.data_ptr<uint8_t>();
  if (type == kQ8_0) run_groups<kQ8_0>(rows, p, N, M, y.data_ptr<float>());
  else if (type == kQ4_0) run_groups<kQ4_0>(rows, p, N, M, y.data_ptr<float>());
  else run_groups<kQ4_1>(rows, p, N, M, y.data_ptr<float>());
  return y;
}

bool q8_tiles_fast() { return vnni_cpu && avx512_on(); }

}  // namespace

TORCH_LIBRARY_FRAGMENT(strix_gguf, m) {
  m.def("pack_q8_tiles(Tensor w, int qtype, int k) -> Tensor");
  m.def("linear_q8_tiles(Tensor x, Tensor packed, int qtype, int n) -> Tensor");
  m.def("q8_tiles_fast() -> bool", &q8_tiles_fast);
}

TORCH_LIBRARY_IMPL(strix_gguf, CPU, m) {
  m.impl("pack_q8_tiles", &pack_q8_tiles);
  m.impl("linear_q8_tiles", &linear_q8_tiles);
}
