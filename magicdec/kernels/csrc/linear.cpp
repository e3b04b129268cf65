// Batch-invariant linear layer for decode-shaped inputs: y[m, n] = x[m, :] · w[n, :] + b[n], with x, b and
// y in float32 and w in float32, bfloat16 or float16 (widened to float32 as it is read; see elements.h).
//
// This file owns the arithmetic of `magicdec.kernels.cpu.linear` (AVX2/FMA + OpenMP, no torch headers;
// bindings.cpp checks the tensors, converts x and b to float32 and y back, and calls `linear_f32`).
//
// Numerics (the contract): every output element is computed by exactly the same sequence of operations,
// whatever M, the other rows of x, the tile it falls in, the thread count or the partition of the work:
//   acc[0..8) = 0;  for k0 = 0, 8, 16, ...: acc[i] = fma(x[k0 + i], w[k0 + i], acc[i])   (a K tail
//   is read padded with zeros, so missing lanes add fma(0, 0, acc) = acc);
//   dot = ((acc0 + acc1) + (acc2 + acc3)) + ((acc4 + acc5) + (acc6 + acc7));  y = dot + b.
// All tile shapes below implement exactly this (`reduce4` computes that tree for each lane), so the
// kernel is bitwise batch-invariant. The weight's type changes only how w[k] is read (exactly), not this.
//
// int8 weights (`linear_int8_f32`, symmetric per-row quantization: w[n, k] ≈ q[n, k] * scale[n]): q is
// read as int8 (a quarter of the float32 bytes), sign-extended and converted to float32 exactly, and the
// dot product above runs on it unchanged; then y = dot * scale + b (a multiply, then an add: two roundings,
// -ffp-contract=off). So the int8 path is batch-invariant too, and differs from the float32 kernel on the
// dequantized weight q * scale only by where the scale's rounding happens (~1e-7 relative).
// The widening (vpmovsxbd + vcvtdq2ps per 8 weights) is the price: at one row of x the int8 kernel runs
// near the memory bound (3-4x the float32 kernel), at 8 rows it is bound by the FMAs (~2x).
//
// Performance: the weight is streamed from memory once per call; each 3-row weight tile serves every
// 4-row tile of x while it is in L1, and x stays in L1/L2 (for many rows, x is taken in L2-sized parts
// and the weight block, kept in L2, is read again from there). A 4 x 3 register tile (12 accumulators)
// does 12 FMAs per 7 loads, so the kernel is bound by memory for few rows and by FMA throughput beyond.

#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "elements.h"

namespace magicdec_cpu {
namespace {

// Lane i of the result is the sum of the 8 lanes of the i-th argument, always computed as
// ((x0 + x1) + (x2 + x3)) + ((x4 + x5) + (x6 + x7)). Each lane only depends on its own argument.
inline __m128 reduce4(__m256 a, __m256 b, __m256 c, __m256 d) {
  const __m256 t0 = _mm256_hadd_ps(a, b);  // a0+a1, a2+a3, b0+b1, b2+b3 | a4+a5, a6+a7, b4+b5, b6+b7
  const __m256 t1 = _mm256_hadd_ps(c, d);
  const __m256 t2 = _mm256_hadd_ps(t0, t1);  // (a0+a1)+(a2+a3), ... | (a4+a5)+(a6+a7), ...
  return _mm_add_ps(_mm256_castps256_ps128(t2), _mm256_extractf128_ps(t2, 1));
}

// A mask selecting the first n lanes (0 <= n <= 4) of a 128-bit vector.
inline __m128i lanes_mask4(int n) {
  alignas(16) static const int32_t table[8] = {-1, -1, -1, -1, 0, 0, 0, 0};
  return _mm_loadu_si128(reinterpret_cast<const __m128i*>(table + 4 - n));
}

// Rows of x per register tile and rows of w per register tile: 12 accumulators + 3 weight vectors +
// 1 x vector = 16 ymm registers.
constexpr int kMR = 4;
constexpr int kNR = 3;
// Bytes of weight rows per work block (the unit of scheduling): a block stays in the 512 KiB L2 while
// the rows of x pass over it.
constexpr int64_t kBlockBytes = 96 * 1024;
// Bytes of x rows processed per pass over a block: x and the weight block share the L2.
constexpr int64_t kXBytes = 256 * 1024;
// How many weight tiles ahead to prefetch: the hardware prefetchers alone leave the loads waiting on memory.
constexpr int64_t kPrefetchTiles = 2;
// Bytes per cache line (the prefetch granularity).
constexpr int64_t kLine = 64;
// Below this many multiply-adds a call runs on one thread (an OpenMP fork costs a few microseconds).
constexpr int64_t kParallelMinFlops = 1 << 16;

// One register tile: y[0..MR) x [0..NR) of x rows and w rows (weights of type W), times scale[0..NR) when
// scale is not null (int8 weights), plus bias[0..NR) when bias is not null. Meanwhile it prefetches
// `pf_lines` cache lines from `pf` on (a part of a weight tile further on), spread evenly over its steps over K.
template <typename W, int MR, int NR>
void tile(const float* x, int64_t ldx, const W* w, int64_t ldw, int64_t K, const float* scale, const float* bias,
          float* y, int64_t ldy, const char* pf, int64_t pf_lines) {
  static_assert(MR >= 1 && MR <= kMR && NR >= 1 && NR <= 4, "tile shape");
  __m256 acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_setzero_ps();
  int64_t k = 0;
  if (pf_lines > 0) {
    const int64_t steps = std::max<int64_t>(1, K / 16);
    const int64_t per_step = (pf_lines + steps - 1) / steps;
    int64_t issued = 0;
    for (; k + 16 <= K; k += 16) {
      for (int64_t p = 0; p < per_step && issued < pf_lines; ++p, ++issued)
        _mm_prefetch(pf + issued * kLine, _MM_HINT_T0);
      for (int64_t kk = k; kk < k + 16; kk += 8) {
        __m256 wv[NR];
        for (int j = 0; j < NR; ++j) wv[j] = load8(w + j * ldw + kk);
        for (int i = 0; i < MR; ++i) {
          const __m256 xv = _mm256_loadu_ps(x + i * ldx + kk);
          for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_fmadd_ps(xv, wv[j], acc[i][j]);
        }
      }
    }
  }
  for (; k + 8 <= K; k += 8) {
    __m256 wv[NR];
    for (int j = 0; j < NR; ++j) wv[j] = load8(w + j * ldw + k);
    for (int i = 0; i < MR; ++i) {
      const __m256 xv = _mm256_loadu_ps(x + i * ldx + k);
      for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_fmadd_ps(xv, wv[j], acc[i][j]);
    }
  }
  if (k < K) {  // masked tail: absent lanes read as 0 and leave their accumulator unchanged
    __m256 wv[NR];
    for (int j = 0; j < NR; ++j) wv[j] = load8_first(w + j * ldw + k, K - k);
    for (int i = 0; i < MR; ++i) {
      const __m256 xv = load8_first(x + i * ldx + k, K - k);
      for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_fmadd_ps(xv, wv[j], acc[i][j]);
    }
  }
  const __m256 zero = _mm256_setzero_ps();
  const __m128i out_mask = lanes_mask4(NR);
  const __m128 b = bias != nullptr ? _mm_maskload_ps(bias, out_mask) : _mm_setzero_ps();
  const __m128 s = scale != nullptr ? _mm_maskload_ps(scale, out_mask) : _mm_setzero_ps();
  for (int i = 0; i < MR; ++i) {
    __m128 r = reduce4(acc[i][0], NR > 1 ? acc[i][1 % NR] : zero, NR > 2 ? acc[i][2 % NR] : zero,
                       NR > 3 ? acc[i][3 % NR] : zero);
    if (scale != nullptr) r = _mm_mul_ps(r, s);
    if (bias != nullptr) r = _mm_add_ps(r, b);
    if (NR == 4) {
      _mm_storeu_ps(y + i * ldy, r);
    } else {
      _mm_maskstore_ps(y + i * ldy, out_mask, r);
    }
  }
}

template <typename W>
using TileFn = void (*)(const float*, int64_t, const W*, int64_t, int64_t, const float*, const float*, float*,
                        int64_t, const char*, int64_t);

template <typename W, int MR>
constexpr TileFn<W> pick_nr(int nr) {
  return nr == 1 ? tile<W, MR, 1> : nr == 2 ? tile<W, MR, 2> : tile<W, MR, 3>;
}

template <typename W>
TileFn<W> pick(int mr, int nr) {
  switch (mr) {
    case 1: return pick_nr<W, 1>(nr);
    case 2: return pick_nr<W, 2>(nr);
    case 3: return pick_nr<W, 3>(nr);
    default: return pick_nr<W, 4>(nr);
  }
}

template <typename W>
void linear_impl(const float* x, int64_t M, int64_t K, int64_t ldx, const W* w, int64_t N, int64_t ldw,
                 const float* scale, const float* bias, float* y, int64_t ldy) {
  if (M <= 0 || N <= 0) return;
  const int64_t row_bytes = std::max<int64_t>(1, K * static_cast<int64_t>(sizeof(W)));
  const int64_t rows_per_block = std::max<int64_t>(kNR, kBlockBytes / row_bytes / kNR * kNR);
  // x rows are float32 (for int8 weights, count them so; 16-bit weights keep the count they were tuned with).
  const int64_t x_row_bytes = std::is_same<W, int8_t>::value ? K * 4 : row_bytes;
  const int64_t x_rows = std::max<int64_t>(kMR, kXBytes / x_row_bytes / kMR * kMR);
  const int64_t blocks = (N + rows_per_block - 1) / rows_per_block;
  const bool parallel = blocks > 1 && M * N * K >= kParallelMinFlops;
  // Within a block, each 3-row weight tile is loaded once (from memory) and used by every row tile of
  // x while it sits in L1, so reading the weight overlaps with the arithmetic.
#pragma omp parallel for schedule(dynamic, 1) if (parallel)
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const int64_t n_begin = blk * rows_per_block;
    const int64_t n_end = std::min(N, n_begin + rows_per_block);
    for (int64_t mb = 0; mb < M; mb += x_rows) {
      const int64_t m_end = std::min(M, mb + x_rows);
      const int64_t m_tiles = (m_end - mb + kMR - 1) / kMR;
      for (int64_t n0 = n_begin; n0 < n_end; n0 += kNR) {
        const int nr = static_cast<int>(std::min<int64_t>(kNR, n_end - n0));
        // While x passes over this weight tile for the first time, the row tiles of x share the prefetch
        // of the tile kPrefetchTiles further on (contiguous rows only), so that memory stays busy.
        const int64_t n_pf = n0 + kPrefetchTiles * kNR;
        const bool prefetch = mb == 0 && ldw == K && n_pf + kNR <= N;
        const int64_t lines = prefetch ? kNR * row_bytes / kLine : 0;
        for (int64_t m0 = mb, t = 0; m0 < m_end; m0 += kMR, ++t) {
          const int mr = static_cast<int>(std::min<int64_t>(kMR, m_end - m0));
          const int64_t first = lines * t / m_tiles, last = lines * (t + 1) / m_tiles;
          const char* pf = prefetch ? reinterpret_cast<const char*>(w + n_pf * ldw) + first * kLine : nullptr;
          pick<W>(mr, nr)(x + m0 * ldx, ldx, w + n0 * ldw, ldw, K, scale != nullptr ? scale + n0 : nullptr,
                          bias != nullptr ? bias + n0 : nullptr, y + m0 * ldy + n0, ldy, pf, last - first);
        }
      }
    }
  }
}

}  // namespace

// y [M, N] (row stride ldy) = x [M, K] (row stride ldx) · w [N, K]ᵀ (row stride ldw, elements of type
// `wtype`) + bias [N] (or null). All last dimensions contiguous. Runs on the OpenMP threads of the caller.
void linear_f32(const float* x, int64_t M, int64_t K, int64_t ldx, const void* w, Elem wtype, int64_t N,
                int64_t ldw, const float* bias, float* y, int64_t ldy) {
  switch (wtype) {
    case Elem::bf16:
      linear_impl(x, M, K, ldx, static_cast<const bf16_t*>(w), N, ldw, nullptr, bias, y, ldy);
      break;
    case Elem::f16:
      linear_impl(x, M, K, ldx, static_cast<const f16_t*>(w), N, ldw, nullptr, bias, y, ldy);
      break;
    default:
      linear_impl(x, M, K, ldx, static_cast<const float*>(w), N, ldw, nullptr, bias, y, ldy);
      break;
  }
}

// y [M, N] = (x [M, K] · w [N, K]ᵀ) * scale [N] + bias [N] (or null) for int8 weights w (symmetric
// quantization, one scale per output row). Same contract and strides as linear_f32.
void linear_int8_f32(const float* x, int64_t M, int64_t K, int64_t ldx, const int8_t* w, int64_t N, int64_t ldw,
                     const float* scale, const float* bias, float* y, int64_t ldy) {
  linear_impl(x, M, K, ldx, w, N, ldw, scale, bias, y, ldy);
}

}  // namespace magicdec_cpu
