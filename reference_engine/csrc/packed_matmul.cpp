// The float32 matmul of the decode kernels, for a few rows of activations: `packed_linear`
// and the float32 blocks of `llama_block_decode` (decode_kernels.cpp) call it. Why a packed
// copy of each weight: decode_kernels.cpp's header comment.
#include "packed_matmul.h"

#include <immintrin.h>

#include "vec16.h"

namespace dojo {

namespace {

// Layout of a packed weight W (n_out, K): shape (n_out / 16 rounded up, K, 16), where
// packed[j][k][i] = W[16 j + i][k] (zero past n_out). One step of k loads the 16 weights
// that feed 16 outputs from one cache line, and each activation x[m][k] multiplies all 16.

// y[m0:m0+R, block nb0:nb0+C] for R rows of x (M, K) and C column blocks, with R*C
// accumulators in registers.
template <int R, int C>
void tile(const float* x, int64_t m0, const float* packed, int64_t K, int64_t nb0, float* y, int64_t n_out) {
  vec16 acc[R][C] = {};
  const float* w = packed + nb0 * K * kLanes;
  const float* xm = x + m0 * K;
  for (int64_t k = 0; k < K; ++k) {
    vec16 wv[C];
    // from 4 rows on, the weights 32 steps ahead are asked for non-temporal (used once per
    // step, as in quant_matmul.cpp): float32 at batch 16, `generate`, 10 alternating rounds,
    // 19.1 -> 17.7 and 19.3 -> 18.8 ms a step in two runs. At batch 1 the hardware prefetcher
    // already streams them at 90% of the bandwidth, and the hint measured no better.
    if constexpr (R >= 4)
      for (int c = 0; c < C; ++c)
        _mm_prefetch(reinterpret_cast<const char*>(w + (c * K + k + 32) * kLanes), _MM_HINT_NTA);
    for (int c = 0; c < C; ++c) wv[c] = *reinterpret_cast<const vec16*>(w + (c * K + k) * kLanes);
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < C; ++c) acc[r][c] += wv[c] * xm[r * K + k];  // the scalar is broadcast to 16 lanes
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) {
      const int64_t col = (nb0 + c) * kLanes;
      float* out = y + (m0 + r) * n_out + col;
      if (col + kLanes <= n_out) {
        *reinterpret_cast<vec16u*>(out) = acc[r][c];
      } else {
        for (int64_t i = 0; col + i < n_out; ++i) out[i] = acc[r][c][i];
      }
    }
}

// All M rows for C column blocks starting at nb0: tiles of 8 rows, then 4, 2, 1.
template <int C>
void rows_of(const float* x, int64_t M, const float* packed, int64_t K, int64_t nb0, float* y, int64_t n_out) {
  int64_t m = 0;
  for (; m + 8 <= M; m += 8) tile<8, C>(x, m, packed, K, nb0, y, n_out);
  if (m + 4 <= M) tile<4, C>(x, m, packed, K, nb0, y, n_out), m += 4;
  if (m + 2 <= M) tile<2, C>(x, m, packed, K, nb0, y, n_out), m += 2;
  if (m < M) tile<1, C>(x, m, packed, K, nb0, y, n_out);
}

// Groups of C column blocks are shared out between the threads; a thread runs every row
// of its group while the group's weights sit in its cache.
template <int C>
void matmul_groups(const float* x, int64_t M, const float* packed, int64_t K, int64_t n_blocks, float* y,
                   int64_t n_out) {
  const int64_t groups = (n_blocks + C - 1) / C;
#pragma omp parallel for schedule(static)
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t nb0 = g * C;
    if (nb0 + C <= n_blocks) {
      rows_of<C>(x, M, packed, K, nb0, y, n_out);
    } else {
      for (int64_t nb = nb0; nb < n_blocks; ++nb) rows_of<1>(x, M, packed, K, nb, y, n_out);
    }
  }
}

}  // namespace

// How many column blocks a tile spans is chosen so that the tile has enough independent
// accumulators to hide the latency of one FMA (1 row: 2 blocks) without running out of
// registers (8 rows: 3 blocks = 24 of 32).
void packed_matmul(const float* x, int64_t M, int64_t K, const float* packed, int64_t n_blocks, float* y,
                   int64_t n_out) {
  if (M == 1) {
    matmul_groups<2>(x, M, packed, K, n_blocks, y, n_out);
  } else if (M < 8) {
    matmul_groups<4>(x, M, packed, K, n_blocks, y, n_out);
  } else {
    matmul_groups<3>(x, M, packed, K, n_blocks, y, n_out);
  }
}

}  // namespace dojo
