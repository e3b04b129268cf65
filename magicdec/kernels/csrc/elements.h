// The element types the CPU kernels read (float32, bfloat16, float16, and int8 for quantized weights) and
// their exact conversion to float32 vectors. Weights, keys and values are read in their own type and widened to float32 in
// registers; all arithmetic is float32, so a kernel computes on 16-bit inputs bitwise what it computes
// on the same values stored as float32.

#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>

namespace magicdec_cpu {

// The storage type of weights, keys and values (codes shared with bindings.cpp).
enum class Elem : int { f32 = 0, bf16 = 1, f16 = 2 };

// 16-bit storage types (bit patterns only; never computed with).
struct bf16_t {
  uint16_t bits;
};
struct f16_t {
  uint16_t bits;
};

// Eight consecutive elements as floats (exact: every bfloat16 and float16 value is a float32 value).
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const bf16_t* p) {  // bfloat16 is the upper half of a float32
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline __m256 load8(const f16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
// int8 (quantized weights; the kernel applies their scale after the dot product): sign-extended to int32,
// then converted (exactly) to float32.
inline __m256 load8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

// The first n (0 <= n <= 8) elements as floats, the other lanes 0; reads nothing beyond p[n).
template <typename E>
inline __m256 load8_first(const E* p, int64_t n) {
  E buf[8] = {};
  std::memcpy(buf, p, static_cast<size_t>(n) * sizeof(E));
  return load8(buf);
}

}  // namespace magicdec_cpu
