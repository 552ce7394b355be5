// Attention for one new token per row over a KV cache, for the fused decode step
// (decode_kernels.cpp's llama_block_decode): softmax(q k^T / sqrt(D)) v over the cache's
// slots, per row and KV head with the query heads that share it. The cache holds float32 or
// float16 keys and values, or int8 codes with a float32 scale per block of 32 (T); the
// arithmetic is float32.
#pragma once

#include <c10/util/Half.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
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

// 16 int8 codes as floats.
inline vec16 load_kv(const int8_t* p) {
#if defined(__AVX512F__)
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#else
  vec16 v;
  for (int i = 0; i < kLanes; ++i) v[i] = static_cast<float>(p[i]);
  return v;
#endif
}

constexpr int64_t kKvBlock = 32;  // int8 entries per scale (kv_cache.py's KV_BLOCK)

// One row's keys or values for one KV head: slots of D entries, float32, float16, or int8
// codes with a float32 scale per block of 32 entries of a slot (`scale`, (slots, D / 32)).
// `at` and `prefetch` take D from the caller, where it is a constant for SmolLM2's heads of
// 64 (score_heads, weigh_values): unrolled, the int8 attention took 0.77-0.81 ms where it
// took 0.93-0.94 (91 slots at batch 16, 30 layers, a C++ loop over caches in memory; float16
// 1.00 against 1.04, float32 the same).
template <typename T>
struct Slots {
  static constexpr bool kCodes = std::is_same_v<T, int8_t>;
  const T* data;
  const float* scale;  // int8 only
  int64_t D;

  // entries c .. c + 15 of slot s as floats: an int8 code times its block's scale, the same
  // float product as the PyTorch path's dequantization (`kv_cache.dequantize_kv`)
  vec16 at(int64_t s, int64_t c, int64_t D) const {
    if constexpr (kCodes) return load_kv(data + s * D + c) * scale[s * (D / kKvBlock) + c / kKvBlock];
    return load_kv(data + s * D + c);
  }
  void prefetch(int64_t s, int64_t D) const {
    for (int64_t line = 0; line < D; line += 64 / static_cast<int64_t>(sizeof(T)))
      __builtin_prefetch(data + s * D + line);
    if constexpr (kCodes) __builtin_prefetch(scale + s * (D / kKvBlock));
  }
  Slots from(int64_t first) const { return {data + first * D, kCodes ? scale + first * (D / kKvBlock) : scale, D}; }
};

// out[h] = sum_s p[h][s] v[s] for G query heads, 64 outputs from offset i (4 registers per
// head: G * 4 independent sums, each value loaded once for all G heads).
template <int G, typename S, int kD = 0>
void weigh_values(const float* const* p, const S values, int64_t n_slots, int64_t i, float* out) {
  if (kD == 0 && values.D == 64) return weigh_values<G, S, 64>(p, values, n_slots, i, out);
  const int64_t D = kD ? kD : values.D;
  vec16 acc[G][4] = {};
  for (int64_t s = 0; s < n_slots; ++s) {
    vec16 v[4];
    for (int j = 0; j < 4; ++j) v[j] = values.at(s, i + j * kLanes, D);
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
template <int G, typename S, int kD = 0>
void score_heads(const float* q, const S keys, const S values, int64_t n_slots, float scale, float* const* sc) {
  if (kD == 0 && keys.D == 64) return score_heads<G, S, 64>(q, keys, values, n_slots, scale, sc);
  const int64_t D = kD ? kD : keys.D;
  const auto score_of = [&](int64_t s, vec16* acc) {  // one slot's q . k per head, before the lanes are summed
    for (int h = 0; h < G; ++h) acc[h] = vec16{};
    for (int64_t c = 0; c < D; c += kLanes) {
      const vec16 k = keys.at(s, c, D);
      for (int h = 0; h < G; ++h) acc[h] += *reinterpret_cast<const vec16u*>(q + h * D + c) * k;
    }
  };
  int64_t s = 0;
  for (; s + kLanes <= n_slots; s += kLanes) {
    vec16 partial[G][kLanes];
    for (int j = 0; j < kLanes; ++j) {
      keys.prefetch(s + kLanes + j, D);
      values.prefetch(s + j, D);
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
// and out (group, D) contiguous; keys and values: n_slots slots (Slots<T>, or any type with
// its at, prefetch, from and D: paged_attention.cpp's PagedSlots reads a serving pool). A
// slot with valid[s] false (padding) weighs nothing; the newest slot (the row's own token)
// always counts. D is a multiple of 16. At batch 16 this reads the cache from memory (48 MB
// per step at slot 64 for SmolLM2 in float32), so each key and value is read once for the
// whole group (score_heads, weigh_values), and asked for ahead of use: 30 blocks took 6.0
// ms where one query head at a time, without prefetching, took 6.4 (median of 15 rounds,
// side by side). A float16 cache halves the bytes.
template <typename S>
void attend_group(const float* q, S keys, S values, int64_t n_slots, int64_t group, const bool* valid, float scale,
                  float* out) {
  const int64_t D = keys.D;
  if (valid) {
    // Left padding (a batch of prompts of different lengths) is a run of invalid slots at the
    // start: they weigh exactly 0, so they are not read at all. The run is cut to whole groups
    // of 16 slots, which keeps every sum below in the same order: the result is the same, bit
    // for bit. (bench's batch of 16 prompts of 16-76 tokens is about a third padding.)
    int64_t first = 0;
    while (first + 1 < n_slots && !valid[first]) ++first;
    first -= first % kLanes;
    keys = keys.from(first), values = values.from(first), valid += first, n_slots -= first;
  }
  // each head's scores padded to whole groups of 16 slots with -inf (a weight of 0), so that
  // the softmax runs 16 slots at a time to the end: with a scalar max and a scalar exp for the
  // last slots it took 30% of the int8 attention (91 slots)
  const int64_t padded = (n_slots + kLanes - 1) / kLanes * kLanes;
  std::vector<float> score(group * padded, -INFINITY);
  std::vector<float*> weights(group);
  for (int64_t h = 0; h < group; ++h) weights[h] = score.data() + h * padded;
  for (int64_t h0 = 0; h0 < group; h0 += 4) {  // up to 4 heads per pass over the keys
    float* const* sc = weights.data() + h0;
    const float* qh = q + h0 * D;
    switch (std::min<int64_t>(4, group - h0)) {
      case 1: score_heads<1>(qh, keys, values, n_slots, scale, sc); break;
      case 2: score_heads<2>(qh, keys, values, n_slots, scale, sc); break;
      case 3: score_heads<3>(qh, keys, values, n_slots, scale, sc); break;
      default: score_heads<4>(qh, keys, values, n_slots, scale, sc); break;
    }
  }
  for (int64_t h = 0; h < group; ++h) {
    float* sc = weights[h];
    int64_t s;
    if (valid)
      for (s = 0; s + 1 < n_slots; ++s)
        if (!valid[s]) sc[s] = -INFINITY;
    const vec16 zero = {}, hidden = zero - INFINITY;
    vec16 highest = hidden;
    for (s = 0; s < padded; s += kLanes) {
      const vec16 v = *reinterpret_cast<const vec16u*>(sc + s);
      highest = v > highest ? v : highest;
    }
    float top = -INFINITY;
    for (int i = 0; i < kLanes; ++i) top = std::max(top, highest[i]);
    // e^(score - top) / total (a scalar exp per slot cost ~2 ms per step at batch 16); a
    // padding slot (-inf) weighs exactly 0
    vec16 partial = {};
    for (s = 0; s < padded; s += kLanes) {
      const vec16 v = *reinterpret_cast<const vec16u*>(sc + s);
      const vec16 e = v == hidden ? zero : exp16(v - top);
      *reinterpret_cast<vec16u*>(sc + s) = e;
      partial += e;
    }
    const float inverse = 1.0f / sum_lanes(partial);
    for (s = 0; s < padded; s += kLanes) *reinterpret_cast<vec16u*>(sc + s) *= inverse;
  }
  for (int64_t h0 = 0; h0 < group; h0 += 4) {  // up to 4 heads per pass over the values
    const float* const* p = weights.data() + h0;
    float* o = out + h0 * D;
    for (int64_t i = 0; i < D; i += 4 * kLanes) {
      if (i + 4 * kLanes > D) {  // the last 16 to 48 outputs (D = 16, 32, 48 modulo 64)
        for (int64_t h = h0; h < std::min(group, h0 + 4); ++h)
          for (int64_t c = i; c < D; c += kLanes) {
            vec16 acc = {};
            for (int64_t s = 0; s < n_slots; ++s) acc += values.at(s, c, D) * p[h - h0][s];
            *reinterpret_cast<vec16u*>(out + h * D + c) = acc;
          }
        continue;
      }
      switch (std::min<int64_t>(4, group - h0)) {
        case 1: weigh_values<1>(p, values, n_slots, i, o); break;
        case 2: weigh_values<2>(p, values, n_slots, i, o); break;
        case 3: weigh_values<3>(p, values, n_slots, i, o); break;
        default: weigh_values<4>(p, values, n_slots, i, o); break;
      }
    }
  }
}

// Attention for every row and query head (query head h reads KV head h / group) over
// slots [0, n_slots): q rows of qkv (B, (H + 2 KV) D), caches (rows, KV, slots, D) with the
// given strides (int8: scales ks, vs (rows, KV, slots, D / 32), else nullptr), valid
// (B, >= n_slots) or nullptr, att (B, H D).
template <typename T>
void attend_rows(const float* qkv, int64_t B, int64_t H, int64_t KV, int64_t D, const T* kc, const T* vc,
                 const float* ks, const float* vs, int64_t row_stride, int64_t head_stride, int64_t n_slots,
                 const bool* valid, int64_t valid_stride, float* att) {
  const int64_t qkv_width = (H + 2 * KV) * D, group = H / KV;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  // Work items: a row's KV head with its query heads, or, when there are too few of those
  // to share out evenly between the threads (batch 1: 3 for SmolLM2), one query head each.
  const int64_t heads_per_item = B * KV >= 8 ? group : 1, items = B * H / heads_per_item;
  const auto row_of = [&](int64_t item) { return item * heads_per_item / H; };
  const auto cache_of = [&](int64_t item, const T* cache, const float* scales) {  // the item's row and KV head
    const int64_t at = row_of(item) * row_stride + item * heads_per_item % H / group * head_stride;
    return Slots<T>{cache + at, scales ? scales + at / kKvBlock : nullptr, D};
  };
#pragma omp parallel for schedule(static)
  for (int64_t item = 0; item < items; ++item) {
    const int64_t b = row_of(item), head = item * heads_per_item % H;
    const Slots<T> keys = cache_of(item, kc, ks), values = cache_of(item, vc, vs);
    // the next item's first 16 slots, asked for now: each item starts on slots nobody fetched
    // (3-10% off the float16 and int8 attention above)
    if (item + 1 < items) {
      const Slots<T> next_keys = cache_of(item + 1, kc, ks), next_values = cache_of(item + 1, vc, vs);
      if (next_keys.data != keys.data)
        for (int64_t s = 0; s < std::min(kLanes, n_slots); ++s) next_keys.prefetch(s, D), next_values.prefetch(s, D);
    }
    attend_group(qkv + b * qkv_width + head * D, keys, values, n_slots, heads_per_item,
                 valid ? valid + b * valid_stride : nullptr, scale, att + b * H * D + head * D);
  }
}

}  // namespace dojo
