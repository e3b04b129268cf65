// Batch- and query-invariant attention of a few query tokens over a long KV cache with grouped-query
// heads (flash-decoding style, online softmax, fp32 accumulation). q and out are float32; k and v are
// float32, bfloat16 or float16, widened to float32 as they are read (elements.h), so 16-bit caches give
// bitwise what the same values stored as float32 give.
//
// This file owns the arithmetic of `magicdec.kernels.cpu.attention` (AVX2/FMA + OpenMP, no torch headers;
// bindings.cpp checks the tensors, converts q to float32 and the output back, and calls `attention_f32`).
//
// Layout: q [B, Hq, T, D], k and v [B, Hkv, S, D] (any strides, last dimension contiguous), allowed
// [B, T, S] bytes (last dimension contiguous), out [B, Hq, T, D] contiguous. Query head h reads KV head
// h / g (g = Hq / Hkv). The g heads x T tokens that share a KV head form R = g·T "rows" that are processed
// together, so K and V of each KV head are read from memory once per call.
//
// Paged variant (`magicdec.kernels.cpu.paged_attention`): k and v are pools [N, Hkv, P, D] of N pages of
// P slots (any strides, last dimension contiguous) and a table [B, nb] of page ids says where the slots
// of each sequence lie: logical slot s of sequence b is slot s % P of page table[b, s / P] (S = nb·P).
// P is a multiple of kBlock, so every block lies inside one page; the only difference from the dense
// layout is where a block's keys and values are read (and prefetched), so the paged result is bitwise
// the dense result on the gathered cache K[b, h, s] = k[table[b, s / P], h, s % P].
//
// Numerics (the contract): the output of a query row depends only on that row's query, on the keys and
// values it may see and on their slot indices, never on T, B, S, the other rows or the threads:
//   * keys are processed in blocks of kBlock slots at fixed boundaries (slot 0, 64, 128, ...), blocks are
//     grouped into chunks of kChunk slots; each chunk gives a partial softmax state (max m, sum l, acc[D]),
//     and the partials are folded in chunk order, always (the split of S over threads only decides who
//     computes which partial, not how they are combined);
//   * a score is ((q · log2(e)/√D) · k) with the dot product computed like the linear kernel (8 lanes of
//     FMAs over D, then a fixed add tree); masked slots get -inf, probability exactly 0, and add exactly
//     nothing (a block or chunk where the row sees nothing is skipped);
//   * probabilities are 2^(s - m) with a fixed polynomial; sums and P·V accumulate in slot order.
// Rows that see no slot at all get 0.
//
// Block scores (optional, paged only; what `drafter="guided"` selects the draft's blocks by): for every
// sequence b and page p of its table, scores[b, p] = max(scores[b, p], max over the KV heads, the R rows
// of each and the kernel blocks of the page of 2^(m_blk - m_row) / l_row), i.e. the largest attention
// probability that any query row (all g·T of them, padding rows included) gives to a slot of the page;
// m_blk is the block's max score recorded by softmax_block, m_row and l_row the row's final max and sum
// (known after the fold; l_row without the sinks' terms when there are sinks). The block maxima go to a scratch
// array indexed by (head, row, block), written by whichever thread computes the chunk (disjoint entries), and
// are reduced after the fold in a fixed order, so the scores are deterministic and the attention output is
// bitwise unchanged.
//
// Attention sinks (optional, GPT-OSS): a logit per query head in every softmax's denominator, as a slot with a
// zero value that every row sees: write_out divides by l_row + 2^(sink - m_row).

#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "elements.h"

namespace magicdec_cpu {
namespace {

// Slots per online-softmax block (fixed: it is part of the numerics). 64 slots x 64 dims x 4 bytes =
// 16 KiB of K, then 16 KiB of V, which stay in the 32 KiB L1 while all rows use them.
constexpr int64_t kBlock = 64;
// Slots per partial result (fixed: part of the numerics). The unit of work when S is split over threads.
constexpr int64_t kChunk = 256;
static_assert(kChunk % kBlock == 0, "a chunk is a whole number of blocks");
// Bytes per cache line (the prefetch granularity).
constexpr int64_t kLine = 64;
// Split S over threads when there are fewer than this many (batch, KV head) pairs per thread.
constexpr int64_t kMinHeadsPerThread = 4;

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Lane i = sum of the 8 lanes of the i-th argument as ((x0+x1)+(x2+x3)) + ((x4+x5)+(x6+x7)).
inline __m128 reduce4(__m256 a, __m256 b, __m256 c, __m256 d) {
  const __m256 t0 = _mm256_hadd_ps(a, b);
  const __m256 t1 = _mm256_hadd_ps(c, d);
  const __m256 t2 = _mm256_hadd_ps(t0, t1);
  return _mm_add_ps(_mm256_castps256_ps128(t2), _mm256_extractf128_ps(t2, 1));
}

inline float hmax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

// 2^x for x <= 0 (softmax arguments): relative error < 1e-7 for x >= -125, exactly 0 below (and for
// -inf). Range reduction x = n + f with f in [-1/2, 1/2], then a degree-6 fit of 2^f (relative
// error 2e-9 in exact arithmetic, < 1e-7 evaluated in float32), scaled by 2^n through the exponent bits.
inline __m256 exp2_ps(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-125.0f);  // 2^-125 is still a normal float
  const __m256 valid = _mm256_cmp_ps(x, lo, _CMP_GE_OQ);
  const __m256 xc = _mm256_max_ps(x, lo);
  const __m256 n = _mm256_round_ps(xc, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_sub_ps(xc, n);
  __m256 p = _mm256_set1_ps(1.534581097e-04f);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.339993090e-03f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.618489072e-03f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.550328642e-02f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.402264625e-01f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(6.931471825e-01f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(_mm256_cvtps_epi32(n), 23);
  const __m256 r = _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(p), e));
  return _mm256_and_ps(r, valid);
}

inline float exp2_scalar(float x) { return _mm256_cvtss_f32(exp2_ps(_mm256_set1_ps(x))); }

// Eight mask bytes (0 or 1) as a lane mask.
inline __m256 mask8(const uint8_t* m) {
  const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(m));
  const __m256i ints = _mm256_cvtepu8_epi32(bytes);
  return _mm256_castsi256_ps(_mm256_cmpgt_epi32(ints, _mm256_setzero_si256()));
}

struct Problem {
  const float* q;
  int64_t qs_b, qs_h, qs_t;
  const void* k;  // elements of type kv
  int64_t ks_b, ks_h, ks_s;
  const void* v;
  int64_t vs_b, vs_h, vs_s;
  const uint8_t* mask;
  int64_t ms_b, ms_t;
  // Paged layout: table [B, nb] of page ids (row stride ts_b), `page` slots per page; ks_b / vs_b are then
  // the page strides of the pools. nullptr: the dense layout (ks_b / vs_b are the batch strides).
  const int32_t* table;
  int64_t ts_b, page;
  float* out;
  int64_t B, Hq, Hkv, T, S, D;
  int64_t g, R, chunks;
  Elem kv;
  // Block scores (nullptr: none): scores [B, nb] (row stride ss_b); blk_m = scratch [B·Hkv, R, nblk] of the
  // rows' block maxima (nblk = S / kBlock), -inf where a row saw nothing of a block.
  float* scores = nullptr;
  int64_t ss_b = 0;
  float* blk_m = nullptr;
  int64_t nblk = 0;
  // Attention sinks (nullptr: none): sinks[h] · log2(e), one logit per query head that adds 2^(sink - m) to
  // the row's sum (a slot with a zero value that every row of the head sees).
  const float* sinks = nullptr;
};

// One thread's scratch for one (batch, KV head): R rows of prescaled queries, scores of a block, and the
// online-softmax state of the current chunk and of the fold over chunks.
struct Work {
  int64_t R, D, T;
  std::vector<float> q, s, acc, m, l, alpha, tot_m, tot_l, tot_acc;
  std::vector<uint8_t> mask;
  // Block scores: where softmax_block records each row's block max (row r at blk_m[r·blk_stride]), or nullptr.
  float* blk_m = nullptr;
  int64_t blk_stride = 0;
  Work(int64_t R_, int64_t D_, int64_t T_)
      : R(R_), D(D_), T(T_), q(R_ * D_), s(R_ * kBlock), acc(R_ * D_), m(R_), l(R_), alpha(R_), tot_m(R_),
        tot_l(R_), tot_acc(R_ * D_), mask(T_ * kBlock) {}
};

#define MAGICDEC_INLINE inline __attribute__((always_inline))

// Keys per QK tile: a tile's scores of one row are reduced together into one 128-bit vector.
constexpr int kQkKeys = 4;
// Rows per QK tile: 12 accumulators + 4 key vectors (one read from memory) + 1 query vector.
constexpr int kQkRows = 3;

// Scores of MR rows against 4 keys: s[i][j] = q_i · k_j (q already scaled), for D = 8·DC8 (DC8 > 0:
// known at compile time, fully unrolled; 0: D at run time).
template <typename KV, int DC8, int MR>
MAGICDEC_INLINE void qk_tile(const float* q, int64_t D, const KV* const* kp, float* s) {
  const int64_t nd = DC8 > 0 ? 8 * DC8 : D;
  __m256 acc[MR][kQkKeys];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < kQkKeys; ++j) acc[i][j] = _mm256_setzero_ps();
  for (int64_t d = 0; d < nd; d += 8) {
    __m256 kv[kQkKeys];
    for (int j = 0; j < kQkKeys; ++j) kv[j] = load8(kp[j] + d);
    for (int i = 0; i < MR; ++i) {
      const __m256 qv = _mm256_loadu_ps(q + i * nd + d);
      for (int j = 0; j < kQkKeys; ++j) acc[i][j] = _mm256_fmadd_ps(qv, kv[j], acc[i][j]);
    }
  }
  for (int i = 0; i < MR; ++i) _mm_storeu_ps(s + i * kBlock, reduce4(acc[i][0], acc[i][1], acc[i][2], acc[i][3]));
}

// Prefetches one row of D = 8·DC8 elements (DC8 = 0: D at run time) into L2.
template <typename KV, int DC8>
MAGICDEC_INLINE void prefetch_row(const KV* row, int64_t D) {
  const int64_t bytes = (DC8 > 0 ? 8 * DC8 : D) * static_cast<int64_t>(sizeof(KV));
  const char* p = reinterpret_cast<const char*>(row);
  for (int64_t o = 0; o < bytes; o += kLine) _mm_prefetch(p + o, _MM_HINT_T1);
}

// s[r][0..kBlock) = scores of all rows against the nk (<= kBlock) keys at kb; slots >= nk read the
// last key again (they are masked later). Meanwhile it prefetches (into L2) the values of this block
// (vb) and the keys of the next one (nk_next of them, at kn), a few rows per key tile: P·V reads each value
// row in several passes, a pattern that the hardware prefetchers do not follow well, and spreading the
// requests over the computation keeps memory busy without stalling it.
template <typename KV, int DC8>
MAGICDEC_INLINE void qk_block(Work& w, const KV* kb, int64_t ks, int64_t nk, const KV* vb, int64_t vs,
                              const KV* kn, int64_t nk_next) {
  const int64_t R = w.R, D = w.D;
  const float* q = w.q.data();
  float* s = w.s.data();
  for (int64_t j0 = 0; j0 < nk; j0 += kQkKeys) {
    for (int64_t j = j0; j < std::min(j0 + kQkKeys, nk); ++j) prefetch_row<KV, DC8>(vb + j * vs, D);
    for (int64_t j = j0; j < std::min(j0 + kQkKeys, nk_next); ++j) prefetch_row<KV, DC8>(kn + j * ks, D);
    const KV* kp[kQkKeys];
    for (int j = 0; j < kQkKeys; ++j) kp[j] = kb + std::min<int64_t>(j0 + j, nk - 1) * ks;
    int64_t r = 0;
    for (; r + kQkRows <= R; r += kQkRows) qk_tile<KV, DC8, kQkRows>(q + r * D, D, kp, s + r * kBlock + j0);
    if (R - r == 2) qk_tile<KV, DC8, 2>(q + r * D, D, kp, s + r * kBlock + j0);
    if (R - r == 1) qk_tile<KV, DC8, 1>(q + r * D, D, kp, s + r * kBlock + j0);
  }
}

// Online-softmax update of every row for one block: masks the scores, updates m and l, turns the
// scores into probabilities (0 where masked) and records the factor alpha by which acc must be scaled.
inline void softmax_block(Work& w) {
  const int64_t R = w.R, T = w.T;
  for (int64_t r = 0; r < R; ++r) {
    float* s = w.s.data() + r * kBlock;
    const uint8_t* mk = w.mask.data() + (r % T) * kBlock;
    __m256 sv[kBlock / 8];
    __m256 mx = _mm256_set1_ps(kNegInf);
    for (int64_t c = 0; c < kBlock / 8; ++c) {
      sv[c] = _mm256_blendv_ps(_mm256_set1_ps(kNegInf), _mm256_loadu_ps(s + 8 * c), mask8(mk + 8 * c));
      mx = _mm256_max_ps(mx, sv[c]);
    }
    const float m_blk = hmax(mx);
    if (w.blk_m != nullptr) w.blk_m[r * w.blk_stride] = m_blk;
    if (m_blk == kNegInf) {  // the row sees nothing here: probabilities 0, state unchanged
      std::memset(s, 0, kBlock * sizeof(float));
      w.alpha[r] = 1.0f;
      continue;
    }
    const float m_old = w.m[r];
    const float m_new = std::max(m_old, m_blk);
    const float alpha = exp2_scalar(m_old - m_new);  // 0 when m_old = -inf
    const __m256 mn = _mm256_set1_ps(m_new);
    __m256 lsum = _mm256_setzero_ps();
    for (int64_t c = 0; c < kBlock / 8; ++c) {
      const __m256 p = exp2_ps(_mm256_sub_ps(sv[c], mn));
      lsum = _mm256_add_ps(lsum, p);
      _mm256_storeu_ps(s + 8 * c, p);
    }
    const __m256 zero = _mm256_setzero_ps();
    const float l_blk = _mm_cvtss_f32(reduce4(lsum, zero, zero, zero));
    w.l[r] = w.l[r] * alpha + l_blk;
    w.m[r] = m_new;
    w.alpha[r] = alpha;
  }
}

// acc[i][8c..] = acc · alpha_i + sum over keys j < nk (in order) of p[i][j] · v_j, for MR rows and DC
// 8-float columns.
template <typename KV, int MR, int DC>
MAGICDEC_INLINE void pv_tile(const float* p, const float* alpha, float* acc, int64_t D, const KV* vb,
                             int64_t vs, int64_t nk) {
  __m256 a[MR][DC];
  for (int i = 0; i < MR; ++i) {
    const __m256 al = _mm256_set1_ps(alpha[i]);
    for (int c = 0; c < DC; ++c) a[i][c] = _mm256_mul_ps(_mm256_loadu_ps(acc + i * D + 8 * c), al);
  }
  for (int64_t j = 0; j < nk; ++j) {
    __m256 vv[DC];
    for (int c = 0; c < DC; ++c) vv[c] = load8(vb + j * vs + 8 * c);
    for (int i = 0; i < MR; ++i) {
      const __m256 pb = _mm256_broadcast_ss(p + i * kBlock + j);
      for (int c = 0; c < DC; ++c) a[i][c] = _mm256_fmadd_ps(pb, vv[c], a[i][c]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int c = 0; c < DC; ++c) _mm256_storeu_ps(acc + i * D + 8 * c, a[i][c]);
}

// P·V for MR rows starting at row r, in tiles of DC columns (and single columns for a remainder).
template <typename KV, int DC8, int MR, int DC>
MAGICDEC_INLINE void pv_rows(Work& w, int64_t r, const KV* vb, int64_t vs, int64_t nk) {
  const int64_t D = DC8 > 0 ? 8 * DC8 : w.D;
  const float* p = w.s.data() + r * kBlock;
  const float* alpha = w.alpha.data() + r;
  float* acc = w.acc.data() + r * D;
  int64_t c = 0;
  for (; c + DC * 8 <= D; c += DC * 8) pv_tile<KV, MR, DC>(p, alpha, acc + c, D, vb + c, vs, nk);
  for (; c < D; c += 8) pv_tile<KV, MR, 1>(p, alpha, acc + c, D, vb + c, vs, nk);
}

// Rows per P·V tile: 6 rows x 2 columns (12 accumulators + 2 value vectors + 1 broadcast probability);
// fewer rows take 4 columns so that enough accumulators hide the FMA latency.
constexpr int kPvRows = 6;

template <typename KV, int DC8>
MAGICDEC_INLINE void pv_block(Work& w, const KV* vb, int64_t vs, int64_t nk) {
  const int64_t R = w.R;
  int64_t r = 0;
  for (; r + kPvRows <= R; r += kPvRows) pv_rows<KV, DC8, kPvRows, 2>(w, r, vb, vs, nk);
  switch (R - r) {
    case 5: pv_rows<KV, DC8, 5, 2>(w, r, vb, vs, nk); break;
    case 4: pv_rows<KV, DC8, 4, 2>(w, r, vb, vs, nk); break;
    case 3: pv_rows<KV, DC8, 3, 4>(w, r, vb, vs, nk); break;
    case 2: pv_rows<KV, DC8, 2, 4>(w, r, vb, vs, nk); break;
    case 1: pv_rows<KV, DC8, 1, 4>(w, r, vb, vs, nk); break;
    default: break;
  }
}

// Prescaled queries of (b, kv head): row jg·T + t is q[b, kvh·g + jg, t] · log2(e)/√D.
void load_queries(const Problem& P, Work& w, int64_t b, int64_t kvh) {
  const float scale = static_cast<float>(1.4426950408889634 / std::sqrt(static_cast<double>(P.D)));
  const __m256 sc = _mm256_set1_ps(scale);
  for (int64_t r = 0; r < P.R; ++r) {
    const int64_t jg = r / P.T, t = r % P.T;
    const float* src = P.q + b * P.qs_b + (kvh * P.g + jg) * P.qs_h + t * P.qs_t;
    float* dst = w.q.data() + r * P.D;
    for (int64_t d = 0; d < P.D; d += 8) _mm256_storeu_ps(dst + d, _mm256_mul_ps(_mm256_loadu_ps(src + d), sc));
  }
}

// Where the slots of one (batch, KV head) lie in memory: slot j of the dense layout at k + j·ks_s, of the
// paged layout at k + pages[j / page]·ks_p + (j % page)·ks_s (k then points at the KV head in page 0).
// Blocks start at multiples of kBlock and `page` is one too, so a block's slots are consecutive rows.
template <typename KV>
struct Slots {
  const KV* k;
  const KV* v;
  const int32_t* pages;  // the sequence's row of the page table; nullptr: dense
  int64_t ks_s, vs_s, ks_p, vs_p, page;

  Slots(const Problem& P, int64_t b, int64_t kvh)
      : k(static_cast<const KV*>(P.k) + kvh * P.ks_h),
        v(static_cast<const KV*>(P.v) + kvh * P.vs_h),
        pages(P.table != nullptr ? P.table + b * P.ts_b : nullptr),
        ks_s(P.ks_s), vs_s(P.vs_s), ks_p(P.ks_b), vs_p(P.vs_b), page(P.page) {
    if (pages == nullptr) {
      k += b * P.ks_b;
      v += b * P.vs_b;
    }
  }
  const KV* key(int64_t j) const {
    return pages != nullptr ? k + pages[j / page] * ks_p + (j % page) * ks_s : k + j * ks_s;
  }
  const KV* value(int64_t j) const {
    return pages != nullptr ? v + pages[j / page] * vs_p + (j % page) * vs_s : v + j * vs_s;
  }
};

// The partial softmax state (w.m, w.l, w.acc) of chunk `chunk` of (b, kv head), keys and values of type
// KV; DC8 = D / 8 when it is a compile-time constant (D = 64, 128), else 0.
template <typename KV, int DC8>
void compute_chunk(const Problem& P, Work& w, int64_t b, int64_t kvh, int64_t chunk) {
  std::fill(w.m.begin(), w.m.end(), kNegInf);
  std::fill(w.l.begin(), w.l.end(), 0.0f);
  std::fill(w.acc.begin(), w.acc.end(), 0.0f);
  const Slots<KV> slots(P, b, kvh);
  const uint8_t* mb = P.mask + b * P.ms_b;
  const int64_t end = std::min(P.S, (chunk + 1) * kChunk);
  for (int64_t j0 = chunk * kChunk; j0 < end; j0 += kBlock) {
    const int64_t nk = std::min(kBlock, end - j0);
    bool any = false;
    for (int64_t t = 0; t < P.T; ++t) {
      uint8_t* dst = w.mask.data() + t * kBlock;
      std::memcpy(dst, mb + t * P.ms_t + j0, nk);
      std::memset(dst + nk, 0, kBlock - nk);
      for (int64_t j = 0; j < nk && !any; ++j) any = dst[j] != 0;
    }
    if (!any) continue;  // no row sees this block: skipping it is exactly what the rows would compute
    if (P.blk_m != nullptr) {  // softmax_block records the rows' block maxima here
      w.blk_m = P.blk_m + ((b * P.Hkv + kvh) * P.R) * P.nblk + j0 / kBlock;
      w.blk_stride = P.nblk;
    }
    // the next block, also across the chunk boundary (usually the same thread goes on there)
    const int64_t nk_next = std::max<int64_t>(0, std::min(kBlock, P.S - j0 - kBlock));
    const KV* kb = slots.key(j0);
    const KV* vb = slots.value(j0);
    const KV* kn = nk_next > 0 ? slots.key(j0 + kBlock) : kb;  // (paged: maybe another page)
    qk_block<KV, DC8>(w, kb, P.ks_s, nk, vb, P.vs_s, kn, nk_next);
    softmax_block(w);
    w.blk_m = nullptr;
    pv_block<KV, DC8>(w, vb, P.vs_s, nk);
  }
}

// Folds one chunk's partial state (m, l, acc) into the running total (in chunk order).
void fold(const Problem& P, const float* m, const float* l, const float* acc, float* tm, float* tl, float* tacc) {
  for (int64_t r = 0; r < P.R; ++r) {
    if (m[r] == kNegInf) continue;
    const float mn = std::max(tm[r], m[r]);
    const float a = exp2_scalar(tm[r] - mn);  // 0 for the first chunk that the row sees
    const float c = exp2_scalar(m[r] - mn);
    tl[r] = tl[r] * a + l[r] * c;
    const __m256 av = _mm256_set1_ps(a), cv = _mm256_set1_ps(c);
    float* ta = tacc + r * P.D;
    const float* pa = acc + r * P.D;
    for (int64_t d = 0; d < P.D; d += 8) {
      _mm256_storeu_ps(ta + d, _mm256_add_ps(_mm256_mul_ps(_mm256_loadu_ps(ta + d), av),
                                             _mm256_mul_ps(_mm256_loadu_ps(pa + d), cv)));
    }
    tm[r] = mn;
  }
}

// compute_chunk for this problem's head dim (the same arithmetic for every D; constants unroll better).
template <typename KV>
void compute_chunk_d(const Problem& P, Work& w, int64_t b, int64_t kvh, int64_t chunk) {
  switch (P.D) {
    case 64: compute_chunk<KV, 8>(P, w, b, kvh, chunk); break;
    case 128: compute_chunk<KV, 16>(P, w, b, kvh, chunk); break;
    default: compute_chunk<KV, 0>(P, w, b, kvh, chunk); break;
  }
}

// compute_chunk for this problem's key/value type and head dim.
void compute_chunk_any(const Problem& P, Work& w, int64_t b, int64_t kvh, int64_t chunk) {
  switch (P.kv) {
    case Elem::bf16: compute_chunk_d<bf16_t>(P, w, b, kvh, chunk); break;
    case Elem::f16: compute_chunk_d<f16_t>(P, w, b, kvh, chunk); break;
    default: compute_chunk_d<float>(P, w, b, kvh, chunk); break;
  }
}

void reset_total(Work& w) {
  std::fill(w.tot_m.begin(), w.tot_m.end(), kNegInf);
  std::fill(w.tot_l.begin(), w.tot_l.end(), 0.0f);
  std::fill(w.tot_acc.begin(), w.tot_acc.end(), 0.0f);
}

// out[b, kvh·g + jg, t] = total acc / (total l + the head's sink term 2^(sink - total m)) (0 for a row that saw
// nothing). The block scores (head_scores) are relative to the keys only, without the sink, as the Triton kernels'.
void write_out(const Problem& P, const Work& w, int64_t b, int64_t kvh) {
  for (int64_t r = 0; r < P.R; ++r) {
    const int64_t jg = r / P.T, t = r % P.T;
    float* dst = P.out + (((b * P.Hq) + kvh * P.g + jg) * P.T + t) * P.D;
    const float* src = w.tot_acc.data() + r * P.D;
    float l = w.tot_l[r];
    if (l > 0.0f && P.sinks != nullptr)  // std::exp2: any range (a sink may dominate)
      l += std::exp2(P.sinks[kvh * P.g + jg] - w.tot_m[r]);
    if (l > 0.0f) {
      const __m256 lv = _mm256_set1_ps(l);
      for (int64_t d = 0; d < P.D; d += 8) _mm256_storeu_ps(dst + d, _mm256_div_ps(_mm256_loadu_ps(src + d), lv));
    } else {
      std::memset(dst, 0, P.D * sizeof(float));
    }
  }
}

// Block scores of (b, kvh) once its totals are known: hs[p] = max over rows and over the kernel blocks of page p
// of 2^(m_blk - tot_m) / tot_l (0 where no row saw anything).
void head_scores(const Problem& P, const Work& w, int64_t h, float* hs) {
  const int64_t per_page = P.page / kBlock;
  const int64_t pages = P.nblk / per_page;
  std::fill(hs, hs + pages, 0.0f);
  for (int64_t r = 0; r < P.R; ++r) {
    const float l = w.tot_l[r];
    if (!(l > 0.0f)) continue;
    const float m = w.tot_m[r];
    const float* bm = P.blk_m + (h * P.R + r) * P.nblk;
    for (int64_t j = 0; j < P.nblk; ++j) {
      if (bm[j] == kNegInf) continue;
      const float p = exp2_scalar(bm[j] - m) / l;
      float& dst = hs[j / per_page];
      dst = std::max(dst, p);
    }
  }
}

// scores[b, p] = max(scores[b, p], max over the KV heads of hs[(b, kvh), p]).
void reduce_scores(const Problem& P, const float* hs) {
  const int64_t pages = P.nblk / (P.page / kBlock);
  for (int64_t b = 0; b < P.B; ++b) {
    float* dst = P.scores + b * P.ss_b;
    for (int64_t kvh = 0; kvh < P.Hkv; ++kvh) {
      const float* src = hs + (b * P.Hkv + kvh) * pages;
      for (int64_t p = 0; p < pages; ++p) dst[p] = std::max(dst[p], src[p]);
    }
  }
}

}  // namespace

// See the header comment. Strides are in elements; k and v hold elements of type `kv`; D must be a
// multiple of 8 (checked by the caller). table == nullptr: the dense layout (ks_b, vs_b: batch strides;
// ts_b and page unused). Otherwise the paged layout: k and v are pools of pages (ks_b, vs_b: page
// strides), table [B, S / page] holds valid page ids (row stride ts_b) and page is a positive multiple
// of 64 that divides S (all checked by the caller). scores (paged only; nullptr: none) [B, S / page] float32
// (row stride ss_b, last dimension contiguous): max-accumulates the block scores (see the header comment).
void attention_f32(const float* q, int64_t qs_b, int64_t qs_h, int64_t qs_t, const void* k, int64_t ks_b,
                   int64_t ks_h, int64_t ks_s, const void* v, int64_t vs_b, int64_t vs_h, int64_t vs_s, Elem kv,
                   const uint8_t* mask, int64_t ms_b, int64_t ms_t, const int32_t* table, int64_t ts_b,
                   int64_t page, float* out, int64_t B, int64_t Hq, int64_t Hkv, int64_t T, int64_t S, int64_t D,
                   float* scores, int64_t ss_b, const float* sinks) {
  Problem P{q, qs_b, qs_h, qs_t, k, ks_b, ks_h, ks_s, v, vs_b, vs_h, vs_s, mask, ms_b, ms_t, table, ts_b, page,
            out, B, Hq, Hkv, T, S, D, Hq / Hkv, (Hq / Hkv) * T, (S + kChunk - 1) / kChunk, kv};
  P.sinks = sinks;
  const int64_t heads = B * Hkv;
  if (heads == 0 || T == 0) return;
  std::vector<float> blk_m, hs;  // block scores: the rows' block maxima, then each head's page scores
  if (scores != nullptr && table != nullptr) {
    P.scores = scores;
    P.ss_b = ss_b;
    P.nblk = S / kBlock;
    blk_m.assign(heads * P.R * P.nblk, kNegInf);
    hs.assign(heads * (S / page), 0.0f);
    P.blk_m = blk_m.data();
  }
  const int64_t threads = omp_get_max_threads();
  const bool split = P.chunks > 1 && heads < kMinHeadsPerThread * threads;
  if (!split) {
    // One (batch, KV head) per work item; its chunk partials are folded as soon as they are computed.
#pragma omp parallel if (heads > 1)
    {
      Work w(P.R, D, T);
#pragma omp for schedule(dynamic, 1)
      for (int64_t h = 0; h < heads; ++h) {
        const int64_t b = h / Hkv, kvh = h % Hkv;
        load_queries(P, w, b, kvh);
        reset_total(w);
        for (int64_t c = 0; c < P.chunks; ++c) {
          compute_chunk_any(P, w, b, kvh, c);
          fold(P, w.m.data(), w.l.data(), w.acc.data(), w.tot_m.data(), w.tot_l.data(), w.tot_acc.data());
        }
        write_out(P, w, b, kvh);
        if (P.blk_m != nullptr) head_scores(P, w, h, hs.data() + h * (S / page));
      }
    }
    if (P.blk_m != nullptr) reduce_scores(P, hs.data());
    return;
  }
  // Flash-decoding: every (batch, KV head, chunk) is a work item whose partial state is stored, then
  // each (batch, KV head) folds its partials in chunk order, exactly as above.
  const int64_t per = P.R * (D + 2);  // floats per partial: acc [R, D], m [R], l [R]
  std::vector<float> partials(heads * P.chunks * per);
  const int64_t items = heads * P.chunks;
#pragma omp parallel
  {
    Work w(P.R, D, T);
    int64_t loaded = -1;
#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < items; ++it) {
      const int64_t h = it / P.chunks, c = it % P.chunks;
      const int64_t b = h / Hkv, kvh = h % Hkv;
      if (loaded != h) {
        load_queries(P, w, b, kvh);
        loaded = h;
      }
      compute_chunk_any(P, w, b, kvh, c);
      float* dst = partials.data() + it * per;
      std::memcpy(dst, w.acc.data(), P.R * D * sizeof(float));
      std::memcpy(dst + P.R * D, w.m.data(), P.R * sizeof(float));
      std::memcpy(dst + P.R * D + P.R, w.l.data(), P.R * sizeof(float));
    }
#pragma omp for schedule(dynamic, 1)
    for (int64_t h = 0; h < heads; ++h) {
      reset_total(w);
      for (int64_t c = 0; c < P.chunks; ++c) {
        const float* src = partials.data() + (h * P.chunks + c) * per;
        fold(P, src + P.R * D, src + P.R * D + P.R, src, w.tot_m.data(), w.tot_l.data(), w.tot_acc.data());
      }
      write_out(P, w, h / Hkv, h % Hkv);
      if (P.blk_m != nullptr) head_scores(P, w, h, hs.data() + h * (S / page));
    }
  }
  if (P.blk_m != nullptr) reduce_scores(P, hs.data());
}

}  // namespace magicdec_cpu
