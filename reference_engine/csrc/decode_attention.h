// Attention for one new token per row over a KV cache, for the fused decode step
// (decode_kernels.cpp's llama_block_decode): softmax(q k^T / sqrt(D)) v over the cache's
// slots, per row and KV head with the query heads that share it. The cache holds float32 or
// float16 keys and values (T); the arithmetic is float32.
#pragma once

#include <c10/util/Half.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "vec16.h"

namespace dojo {

// 16 keys or values as floats, from a float32 or a float16 cache.
inline vec16 load_kv(const float* p) { return *reinterpret_cast<const vec16u*>(p); }

inline vec16 load_kv(const c10::Half* p) {
#if defined(__AVX512F__)
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
#else
  vec16 v;
  for (int i = 0; i < kLanes; ++i) v[i] = static_cast<float>(p[i]);
  return v;
#endif
}

// out[h] = sum_s p[h][s] v[s] for G query heads, 64 outputs from offset i (4 registers per
// head: G * 4 independent sums, each value loaded once for all G heads).
template <int G, typename T>
void weigh_values(const float* const* p, const T* values, int64_t n_slots, int64_t D, int64_t i, float* out) {
  vec16 acc[G][4] = {};
  for (int64_t s = 0; s < n_slots; ++s) {
    vec16 v[4];
    for (int j = 0; j < 4; ++j) v[j] = load_kv(values + s * D + i + j * kLanes);
    for (int h = 0; h < G; ++h)
      for (int j = 0; j < 4; ++j) acc[h][j] += v[j] * p[h][s];
  }
  for (int h = 0; h < G; ++h)
    for (int j = 0; j < 4; ++j) *reinterpret_cast<vec16u*>(out + h * D + i + j * kLanes) = acc[h][j];
}

// The scores q . k * scale of G query heads against every slot's key: sc[h][s]. Each key
// is loaded once for all G heads, 16 slots at a time, their 16 partial-sum vectors summed
// together; the next 16 keys and these 16 values are asked for ahead of use. (One head at a
// time, the first fetching, read each key G times: attention over 91 slots at batch 16, 30
// layers, took 2.09 ms in float32 and 1.39 in float16, against 1.93 and 1.20 this way; a C++
// loop over caches in memory, medians of 40.)
template <int G, typename T>
void score_heads(const float* q, const T* keys, const T* values, int64_t n_slots, int64_t D, float scale,
                 float* const* sc) {
  constexpr int64_t kPerLine = 64 / sizeof(T);  // cache entries per 64-byte line
  const auto score_of = [&](int64_t s, vec16* acc) {  // one slot's q . k per head, before the lanes are summed
    for (int h = 0; h < G; ++h) acc[h] = vec16{};
    for (int64_t c = 0; c < D; c += kLanes) {
      const vec16 k = load_kv(keys + s * D + c);
      for (int h = 0; h < G; ++h) acc[h] += *reinterpret_cast<const vec16u*>(q + h * D + c) * k;
    }
  };
  int64_t s = 0;
  for (; s + kLanes <= n_slots; s += kLanes) {
    vec16 partial[G][kLanes];
    for (int j = 0; j < kLanes; ++j) {
      for (int64_t line = 0; line < D; line += kPerLine) {
        __builtin_prefetch(keys + (s + kLanes + j) * D + line);
        __builtin_prefetch(values + (s + j) * D + line);
      }
      vec16 acc[G];
      score_of(s + j, acc);
      for (int h = 0; h < G; ++h) partial[h][j] = acc[h];
    }
    for (int h = 0; h < G; ++h) *reinterpret_cast<vec16u*>(sc[h] + s) = sum_lanes_of_16(partial[h]) * scale;
  }
  for (; s < n_slots; ++s) {
    vec16 acc[G];
    score_of(s, acc);
    for (int h = 0; h < G; ++h) sc[h][s] = sum_lanes(acc[h]) * scale;
  }
}

// Attention of `group` query heads that share one KV head, for one row: q (group, D)
// and out (group, D) contiguous; keys and values (n_slots, D), float32 or float16 (T). A
// slot with valid[s] false (padding) weighs nothing; the newest slot (the row's own token)
// always counts. D is a multiple of 16. At batch 16 this reads the cache from memory (48 MB
// per step at slot 64 for SmolLM2 in float32), so each key and value is read once for the
// whole group (score_heads, weigh_values), and asked for ahead of use: 30 blocks took 6.0
// ms where one query head at a time, without prefetching, took 6.4 (median of 15 rounds,
// side by side). A float16 cache halves the bytes.
template <typename T>
void attend_group(const float* q, const T* keys, const T* values, int64_t n_slots, int64_t D, int64_t group,
                  const bool* valid, float scale, float* out) {
  if (valid) {
    // Left padding (a batch of prompts of different lengths) is a run of invalid slots at the
    // start: they weigh exactly 0, so they are not read at all. The run is cut to whole groups
    // of 16 slots, which keeps every sum below in the same order: the result is the same, bit
    // for bit. (bench's batch of 16 prompts of 16-76 tokens is about a third padding.)
    int64_t first = 0;
    while (first + 1 < n_slots && !valid[first]) ++first;
    first -= first % kLanes;
    keys += first * D, values += first * D, valid += first, n_slots -= first;
  }
  std::vector<float> score(group * n_slots);
  std::vector<float*> weights(group);
  for (int64_t h = 0; h < group; ++h) weights[h] = score.data() + h * n_slots;
  for (int64_t h0 = 0; h0 < group; h0 += 4) {  // up to 4 heads per pass over the keys
    float* const* sc = weights.data() + h0;
    const float* qh = q + h0 * D;
    switch (std::min<int64_t>(4, group - h0)) {
      case 1: score_heads<1>(qh, keys, values, n_slots, D, scale, sc); break;
      case 2: score_heads<2>(qh, keys, values, n_slots, D, scale, sc); break;
      case 3: score_heads<3>(qh, keys, values, n_slots, D, scale, sc); break;
      default: score_heads<4>(qh, keys, values, n_slots, D, scale, sc); break;
    }
  }
  for (int64_t h = 0; h < group; ++h) {
    float* sc = weights[h];
    int64_t s;
    if (valid)
      for (s = 0; s + 1 < n_slots; ++s)
        if (!valid[s]) sc[s] = -INFINITY;
    float top = -INFINITY;
    for (s = 0; s < n_slots; ++s) top = std::max(top, sc[s]);
    // e^(score - top) / total, 16 slots at a time (a scalar exp per slot cost ~2 ms per step
    // at batch 16); a padding slot (-inf) weighs exactly 0
    const vec16 zero = {}, hidden = zero - INFINITY;
    vec16 partial = {};
    for (s = 0; s + kLanes <= n_slots; s += kLanes) {
      const vec16 v = *reinterpret_cast<const vec16u*>(sc + s);
      const vec16 e = v == hidden ? zero : exp16(v - top);
      *reinterpret_cast<vec16u*>(sc + s) = e;
      partial += e;
    }
    float total = sum_lanes(partial);
    for (; s < n_slots; ++s) total += (sc[s] = std::exp(sc[s] - top));
    const float inverse = 1.0f / total;
    for (s = 0; s < n_slots; ++s) sc[s] *= inverse;
  }
  for (int64_t h0 = 0; h0 < group; h0 += 4) {  // up to 4 heads per pass over the values
    const float* const* p = weights.data() + h0;
    float* o = out + h0 * D;
    for (int64_t i = 0; i < D; i += 4 * kLanes) {
      if (i + 4 * kLanes > D) {  // the last 16 to 48 outputs (D = 16, 32, 48 modulo 64)
        for (int64_t h = h0; h < std::min(group, h0 + 4); ++h)
          for (int64_t c = i; c < D; c += kLanes) {
            vec16 acc = {};
            for (int64_t s = 0; s < n_slots; ++s) acc += load_kv(values + s * D + c) * p[h - h0][s];
            *reinterpret_cast<vec16u*>(out + h * D + c) = acc;
          }
        continue;
      }
      switch (std::min<int64_t>(4, group - h0)) {
        case 1: weigh_values<1>(p, values, n_slots, D, i, o); break;
        case 2: weigh_values<2>(p, values, n_slots, D, i, o); break;
        case 3: weigh_values<3>(p, values, n_slots, D, i, o); break;
        default: weigh_values<4>(p, values, n_slots, D, i, o); break;
      }
    }
  }
}

// Attention for every row and query head (query head h reads KV head h / group) over
// slots [0, n_slots): q rows of qkv (B, (H + 2 KV) D), caches (rows, KV, slots, D) with the
// given strides, valid (B, >= n_slots) or nullptr, att (B, H D).
template <typename T>
void attend_rows(const float* qkv, int64_t B, int64_t H, int64_t KV, int64_t D, const T* kc, const T* vc,
                 int64_t row_stride, int64_t head_stride, int64_t n_slots, const bool* valid, int64_t valid_stride,
                 float* att) {
  const int64_t qkv_width = (H + 2 * KV) * D, group = H / KV;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  // Work items: a row's KV head with its query heads, or, when there are too few of those
  // to share out evenly between the threads (batch 1: 3 for SmolLM2), one query head each.
  const int64_t heads_per_item = B * KV >= 8 ? group : 1, items = B * H / heads_per_item;
#pragma omp parallel for schedule(static)
  for (int64_t item = 0; item < items; ++item) {
    const int64_t b = item * heads_per_item / H, head = item * heads_per_item % H, g = head / group;
    attend_group(qkv + b * qkv_width + head * D, kc + b * row_stride + g * head_stride,
                 vc + b * row_stride + g * head_stride, n_slots, D, heads_per_item,
                 valid ? valid + b * valid_stride : nullptr, scale, att + b * H * D + head * D);
  }
}

}  // namespace dojo
