// 16-float vectors (GCC/Clang vector extensions) and the few functions of them the decode
// kernels share: a horizontal sum, a dot product, e^x; and the largest magnitude of a block,
// which the int8 quantizers (activations, the KV cache) start from.
#pragma once

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace dojo {

// 16 floats: one 512-bit register (two 256-bit ones on a CPU without AVX-512).
typedef float vec16 __attribute__((vector_size(64)));
// The same, for loads from addresses that need not be 64-byte aligned.
typedef float vec16u __attribute__((vector_size(64), aligned(4)));
constexpr int64_t kLanes = 16;

// The sum of 16 lanes as a tree of depth 4: a left-to-right sum is a chain of 16
// dependent adds, which made every attention score wait ~60 cycles.
inline float sum_lanes(vec16 v) {
  typedef float vec8 __attribute__((vector_size(32)));
  typedef float vec4 __attribute__((vector_size(16)));
  const vec8 h = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                 __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const vec4 q = __builtin_shufflevector(h, h, 0, 1, 2, 3) + __builtin_shufflevector(h, h, 4, 5, 6, 7);
  return (q[0] + q[2]) + (q[1] + q[3]);
}

// Lane i of the result is the sum of the 16 lanes of v[i]: 16 horizontal sums done as one
// transpose folded into 15 adds of two shuffles each (16 separate sums take 16 trees and
// 16 scalar tails). Each level halves the partial sums per vector and packs two vectors into
// one; fed in bit-reversed order, the packing leaves sum i in lane i.
inline vec16 sum_lanes_of_16(const vec16* v) {
  static constexpr int kReversed[16] = {0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15};
  vec16 a[8], b[4], c[2];
  for (int k = 0; k < 8; ++k) {  // lanes 0-7: 8 partial sums of the first vector, 8-15: of the second
    const vec16 x = v[kReversed[2 * k]], y = v[kReversed[2 * k + 1]];
    a[k] = __builtin_shufflevector(x, y, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
           __builtin_shufflevector(x, y, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  }
  for (int k = 0; k < 4; ++k)  // 4 vectors of 4 partial sums each
    b[k] = __builtin_shufflevector(a[2 * k], a[2 * k + 1], 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27) +
           __builtin_shufflevector(a[2 * k], a[2 * k + 1], 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31);
  for (int k = 0; k < 2; ++k)  // 8 vectors of 2
    c[k] = __builtin_shufflevector(b[2 * k], b[2 * k + 1], 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29) +
           __builtin_shufflevector(b[2 * k], b[2 * k + 1], 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31);
  return __builtin_shufflevector(c[0], c[1], 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30) +
         __builtin_shufflevector(c[0], c[1], 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31);
}

inline float dot(const float* a, const float* b, int64_t n) {
  vec16 acc = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    acc += *reinterpret_cast<const vec16u*>(a + i) * *reinterpret_cast<const vec16u*>(b + i);
  float sum = sum_lanes(acc);
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

// e^x for 16 lanes: e^x = 2^n e^r with n = round(x log2 e) and |r| <= ln2 / 2, e^r from
// its Taylor polynomial to r^6 (relative error under 2e-7), 2^n written into the float's
// exponent bits. Inputs are clamped to [-87, 88], where e^x is a normal float.
inline vec16 exp16(vec16 x) {
  typedef int32_t ivec16 __attribute__((vector_size(64)));
  const vec16 lo = x * 0.0f - 87.0f, hi = x * 0.0f + 88.0f;
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  const vec16 t = x * 1.44269504088896341f + 0.5f;
  ivec16 n = __builtin_convertvector(t, ivec16);  // truncates towards zero ...
  n += (__builtin_convertvector(n, vec16) > t);   // ... so step down where t < 0 (a true compare is -1)
  const vec16 nf = __builtin_convertvector(n, vec16);
  const vec16 r = (x - nf * 0.693145751953125f) - nf * 1.428606765330187e-06f;  // ln 2 in two parts
  vec16 p = r * (1.0f / 720) + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const ivec16 bits = (n + 127) << 23;
  vec16 scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// The largest |x[i]| of n values, a NaN if any is NaN: an int8 quantizer's scale, which must
// then be NaN so that the block's values come out NaN, as PyTorch's amax gives them (a max
// that skipped the NaN would quantize the rest of the block as if nothing were wrong).
inline float abs_max(const float* x, int64_t n) {
  float m = 0.0f;
  for (int64_t i = 0; i < n; ++i) {
    if (std::isnan(x[i])) return x[i];
    m = std::max(m, std::fabs(x[i]));
  }
  return m;
}

#if defined(__AVX512F__)
// The same, lane by lane, for two registers, taken on the bits: for floats without their
// sign, integer order is float order, with an infinity above every finite value and a NaN
// above that, so a NaN wins (a float max returns its second operand when either is NaN,
// and drops the NaN by lane).
inline __m512i abs_max_bits(__m512 x0, __m512 x1) {
  return _mm512_max_epi32(_mm512_castps_si512(_mm512_abs_ps(x0)), _mm512_castps_si512(_mm512_abs_ps(x1)));
}

// abs_max of the 32 values in two registers.
inline float abs_max(__m512 x0, __m512 x1) {
  const int32_t bits = _mm512_reduce_max_epi32(abs_max_bits(x0, x1));
  float m;
  std::memcpy(&m, &bits, sizeof m);
  return m;
}
#endif

}  // namespace dojo
