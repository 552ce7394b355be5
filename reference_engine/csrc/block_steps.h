// The row-wise steps of a decode block (decode_kernels.cpp's run_block, behind
// llama_block_decode and llama_block_decode_paged), one function each, for B rows at a
// time: scratch memory kept between calls, RMSNorm, RoPE, SwiGLU, and the writes of each
// row's new key and value heads into a static cache or a serving pool (float32, float16,
// or int8 codes with a scale per 32 values).
#pragma once

#include <c10/util/Half.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "decode_attention.h"
#include "vec16.h"

namespace dojo {

// n floats of scratch memory for one block call (run_block), reused by the next call
// from the same thread (the caller's; the parallel loops inside only index into it).
// Vectors made per call zero-filled their 470 KB at batch 16 every time (30 blocks: 6.20
// against 6.32 ms at 16 rows and 100 slots, 15 alternating rounds).
inline float* scratch(int64_t n) {
  thread_local std::vector<float> buffer;
  if (static_cast<int64_t>(buffer.size()) < n) buffer.resize(n);
  return buffer.data();
}

// fn(r) for each of B rows. The row-wise steps of a block (norms, RoPE, SwiGLU) share their
// rows out between the threads from 4 rows on; for fewer, even entering a parallel region
// costs more than the rows' work.
template <typename Fn>
void for_rows(int64_t B, Fn fn) {
  if (B < 4) {
    for (int64_t r = 0; r < B; ++r) fn(r);
    return;
  }
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < B; ++r) fn(r);
}

// act[r][j] = silu(gate[r][j]) * up[r][j] = gate / (1 + e^-gate) * up, for B rows of
// [gate (F); up (F)]. Written out (vectorised exp) rather than ATen's silu and mul: those
// two small operators cost 70-100 us per call at batch 16, 5 ms per step over 30 blocks.
inline void swiglu(const float* gate_up, int64_t B, int64_t F, float* act) {
  for_rows(B, [&](int64_t r) {
    const float *gate = gate_up + r * 2 * F, *up = gate + F;
    float* out = act + r * F;
    int64_t j = 0;
    for (; j + kLanes <= F; j += kLanes) {
      const vec16 g = *reinterpret_cast<const vec16u*>(gate + j);
      *reinterpret_cast<vec16u*>(out + j) = g / (1.0f + exp16(-g)) * *reinterpret_cast<const vec16u*>(up + j);
    }
    for (; j < F; ++j) out[j] = gate[j] / (1.0f + std::exp(-gate[j])) * up[j];
  });
}

// out[r] = x[r] / sqrt(mean(x[r]^2) + eps) * weight, for each of B rows of width d.
inline void rms_norm(const float* x, const float* weight, float eps, int64_t B, int64_t d, float* out) {
  for_rows(B, [&](int64_t r) {
    const float* xr = x + r * d;
    const float scale = 1.0f / std::sqrt(dot(xr, xr, d) / d + eps);
    for (int64_t i = 0; i < d; ++i) out[r * d + i] = xr[i] * scale * weight[i];
  });
}

// RoPE on one head of D values: v * cos + rotate(v) * sin, where rotate pairs element i
// with i + D/2 ("half" layout) or with its neighbour ("adjacent" layout).
inline void rotate(float* v, const float* cos, const float* sin, int64_t D, bool adjacent) {
  float tmp[512];
  std::copy(v, v + D, tmp);
  if (adjacent) {
    for (int64_t i = 0; i < D; i += 2) {
      v[i] = tmp[i] * cos[i] - tmp[i + 1] * sin[i];
      v[i + 1] = tmp[i + 1] * cos[i + 1] + tmp[i] * sin[i + 1];
    }
    return;
  }
  const int64_t half = D / 2;  // two branch-free loops the compiler vectorises
  for (int64_t i = 0; i < half; ++i) v[i] = tmp[i] * cos[i] - tmp[i + half] * sin[i];
  for (int64_t i = half; i < D; ++i) v[i] = tmp[i] * cos[i] + tmp[i - half] * sin[i];
}

// One key or value head of D floats into the cache: rounded to nearest even where the cache
// is float16 (as PyTorch's copy does); as int8 codes with a scale per block of 32, the
// arithmetic of kv_cache.quantize_kv (scale = max|x| / 127, code = round-half-even(x / scale),
// with the same float division), so both paths write the same bytes. 16 values at a time
// where the CPU has AVX-512 (D is a multiple of 16; of 32 for int8): one value at a time, the
// int8 and float16 writes cost 0.17 and 0.08 ms per step at batch 16, SmolLM2's 30 blocks.
inline void store_head(const float* x, int64_t D, float* out, float* /*scale*/) { std::copy(x, x + D, out); }

inline void store_head(const float* x, int64_t D, c10::Half* out, float* /*scale*/) {
#if defined(__AVX512F__)
  for (int64_t i = 0; i < D; i += kLanes)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i),
                        _mm512_cvtps_ph(_mm512_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#else
  for (int64_t i = 0; i < D; ++i) out[i] = static_cast<c10::Half>(x[i]);
#endif
}

// (A NaN among a block's values makes its scale NaN and its codes 0, as quantize_kv's do:
// abs_max, vec16.h.)
inline void store_head(const float* x, int64_t D, int8_t* out, float* scale) {
  for (int64_t b = 0; b < D; b += kKvBlock) {
#if defined(__AVX512F__)
    const __m512 x0 = _mm512_loadu_ps(x + b), x1 = _mm512_loadu_ps(x + b + kLanes);
    const float d = abs_max(x0, x1) / 127.0f;
    scale[b / kKvBlock] = d;
    if (d > 0.0f) {  // division, not a multiply by 1 / d, and cvtps rounds half to even: quantize_kv's codes
      const __m512 dv = _mm512_set1_ps(d);
      const __m512 q0 = _mm512_div_ps(x0, dv), q1 = _mm512_div_ps(x1, dv);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + b), _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(q0)));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + b + kLanes), _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(q1)));
    } else {
      std::fill(out + b, out + b + kKvBlock, int8_t{0});
    }
#else
    const float d = abs_max(x + b, kKvBlock) / 127.0f;
    scale[b / kKvBlock] = d;
    for (int64_t i = b; i < b + kKvBlock; ++i)
      out[i] = d > 0.0f && std::isfinite(d) ? static_cast<int8_t>(std::nearbyint(x[i] / d)) : 0;
#endif
  }
}

// Write each row's new key and value heads (rows of qkv, after RoPE) into cache slot `slot`
// (store_head; ks, vs: an int8 cache's scales, (rows, KV, slots, D / 32), else nullptr),
// then attention over slots [0, slot] (decode_attention.h).
template <typename T>
void cache_and_attend(const float* qkv, int64_t B, int64_t H, int64_t KV, int64_t D, T* kc, T* vc, float* ks,
                      float* vs, int64_t row_stride, int64_t head_stride, int64_t slot, const bool* valid,
                      int64_t valid_stride, float* att) {
  const int64_t qkv_width = (H + 2 * KV) * D;
  for_rows(B, [&](int64_t b) {
    const float* row = qkv + b * qkv_width;
    for (int64_t g = 0; g < KV; ++g) {
      const int64_t at = b * row_stride + g * head_stride + slot * D;
      store_head(row + (H + g) * D, D, kc + at, ks ? ks + at / kKvBlock : nullptr);
      store_head(row + (H + KV + g) * D, D, vc + at, vs ? vs + at / kKvBlock : nullptr);
    }
  });
  attend_rows<T>(qkv, B, H, KV, D, kc, vc, ks, vs, row_stride, head_stride, slot + 1, valid, valid_stride, att);
}

// Write each row's new key and value heads (rows of qkv, after RoPE) into pool row
// new_rows[b] of a serving pool (KV, R, D) (ks, vs: an int8 pool's scales, else nullptr).
template <typename T>
void store_rows(const float* qkv, int64_t B, int64_t H, int64_t KV, int64_t R, int64_t D, T* kp, T* vp, float* ks,
                float* vs, const int64_t* new_rows) {
  const int64_t qkv_width = (H + 2 * KV) * D;
  for_rows(B, [&](int64_t b) {
    const float* row = qkv + b * qkv_width;
    for (int64_t g = 0; g < KV; ++g) {
      const int64_t at = (g * R + new_rows[b]) * D;
      store_head(row + (H + g) * D, D, kp + at, ks ? ks + at / kKvBlock : nullptr);
      store_head(row + (H + KV + g) * D, D, vp + at, vs ? vs + at / kKvBlock : nullptr);
    }
  });
}

}  // namespace dojo
