// Integer matmuls on quantized weights, for decoding (1 to 64 rows of activations).
//
// Why integers. A decode step reads every weight once per token; 4-bit codes are an eighth
// of float32's bytes, but a kernel that turns each code back into a float before the
// multiply spends more instructions per byte than the memory takes to deliver it, and at
// batch 16 it is as compute-bound as float32. So the activations are quantized too, per
// row and block of 32 inputs to int8 with one float scale (dx), and the products are
// summed in integers: AVX-512 VNNI's vpdpbusd multiplies 64 unsigned bytes by 64 signed
// bytes and adds each group of 4 products into one of 16 int32 lanes, in one instruction.
//
// The weight layout is chosen for that instruction, not taken from the file (the repack
// happens once, in `compression/kernel_layout.py`). Every format becomes unsigned codes u
// with a float scale d and offset m per output and block of 32 inputs: w = d * u + m
// (Q4_1: u = q, m = min; Q4_0 and symmetric int4: m = -8 d; Q8_0 and int8: u = q + 128,
// m = -128 d). One block of 16 outputs x 32 inputs is 512 bytes of 8-bit codes, or 256 of
// 4-bit ones two per byte, arranged so that one 64-byte load holds, for each output lane
// i, the codes of 4 consecutive inputs (8-bit) or of 4 + 4 (4-bit: inputs k..k+3 in the
// low nibbles, k+4..k+7 in the high ones). Then for one row of activations:
//   sum_k w[i][k] x[k] = sum over blocks of  d[i] dx * (sum_k u[i][k] a[k])  +  m[i] * sx
// with sx = dx * sum_k a[k]: the integer sum is exact, and the offset costs one multiply
// per block, not one per weight.
//
// The activations' codes are stored block by block, all rows of block 0 first (a[b][r][k],
// dx and sx [b][r]): a tile of rows then finds row r of the current block at a fixed offset
// r * 32 from one pointer. Stored row by row, each of a 16-row tile's rows needed a pointer
// of its own, more than the registers hold; the compiler kept them, and the 16 sums, on the
// stack (one 3072 x 576 Q4_1 matmul at 16 rows, weights streamed from memory: 550 -> 645 G
// multiply-adds/s with this layout and the row loop unrolled; 1 row: unchanged).
#include "quant_matmul.h"

#include "vec16.h"

#include <c10/util/Half.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>

namespace dojo {

namespace {

// The plain loop of quantize_rows, for one row (its block b goes to a + b * M * 32, dx + b * M).
// A block holding a NaN or an infinity gets that as its scale (abs_max: a NaN wins) and
// codes 0, so that every product it enters is NaN, as in the PyTorch twin.
void quantize_row(const float* x, int64_t nb, int64_t M, int8_t* a, float* dx, float* sx) {
  for (int64_t b = 0; b < nb; ++b) {
    const float* xb = x + b * kQBlock;
    int8_t* ab = a + b * M * kQBlock;
    const float scale = abs_max(xb, kQBlock) / 127.0f;
    const float inverse = scale > 0.0f ? 1.0f / scale : 0.0f;
    int32_t total = 0;
    for (int64_t k = 0; k < kQBlock; ++k) {
      // nearbyint rounds half to even, as torch.round does (the PyTorch path's twin)
      ab[k] = std::isfinite(scale) ? static_cast<int8_t>(std::nearbyint(xb[k] * inverse)) : 0;
      total += ab[k];
    }
    dx[b * M] = scale;
    sx[b * M] = scale * static_cast<float>(total);
  }
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
// The same for one block of 32 values at x, in two registers (the plain loop does not
// vectorise: nearbyint and the int8 narrowing stop the compiler). cvtps_epi32 rounds half
// to even under the default rounding mode, as nearbyint does.
inline void quantize_block(const float* x, int8_t* a, float* dx, float* sx) {
  const __m512 x0 = _mm512_loadu_ps(x), x1 = _mm512_loadu_ps(x + 16);
  const float scale = abs_max(x0, x1) / 127.0f;
  const __m512 inverse = _mm512_set1_ps(scale > 0.0f ? 1.0f / scale : 0.0f);
  const __mmask16 keep = std::isfinite(scale) ? 0xFFFF : 0;  // else codes 0 (quantize_row)
  const __m512i q0 = _mm512_maskz_cvtps_epi32(keep, _mm512_mul_ps(x0, inverse));
  const __m512i q1 = _mm512_maskz_cvtps_epi32(keep, _mm512_mul_ps(x1, inverse));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(a), _mm512_cvtepi32_epi8(q0));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(a + 16), _mm512_cvtepi32_epi8(q1));
  *dx = scale;
  *sx = scale * static_cast<float>(_mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1)));
}

// The lanes each level of reduce16 takes from a pair (A, B). Before level l, A and B each
// hold the partial results of 1 << l original vectors, 2g = 16 >> l of each; the level
// halves that: out lane j (A's for j < 8, B's from j = 8, whose indices count from 16) is
// partial p = (j % 8) % g of the source's vector k = (j % 8) / g, combined with the partial
// g lanes on.
struct ReduceLanes {
  int32_t lo[4][16], hi[4][16];
  constexpr ReduceLanes() : lo(), hi() {
    for (int l = 0; l < 4; ++l)
      for (int j = 0, g = 8 >> l; j < 16; ++j) {
        const int k = (j % 8) / g, p = (j % 8) % g;
        lo[l][j] = (j < 8 ? 0 : 16) + k * 2 * g + p;
        hi[l][j] = lo[l][j] + g;
      }
  }
};
alignas(64) constexpr ReduceLanes kReduceLanes;

// Lane j of the result: op over the 16 lanes of v[j], for 16 vectors at once (v is
// overwritten). Reduced one at a time, each vector takes 4 shuffle-and-op steps whose later
// ones use a fraction of the register; here every step works on full registers: each level
// puts a pair's partial results side by side, A's in the low half and B's in the high half,
// so 8 + 4 + 2 + 1 steps do the work of 16 x 4.
template <typename Op>
inline __m512i reduce16(__m512i* v, Op op) {
  for (int l = 0; l < 4; ++l) {
    const __m512i lo = _mm512_load_si512(kReduceLanes.lo[l]), hi = _mm512_load_si512(kReduceLanes.hi[l]);
    for (int i = 0; i < (8 >> l); ++i)
      v[i] = op(_mm512_permutex2var_epi32(v[2 * i], lo, v[2 * i + 1]),
                _mm512_permutex2var_epi32(v[2 * i], hi, v[2 * i + 1]));
  }
  return v[0];
}

// quantize_rows, 16 blocks at a time: their 16 maxima and 16 sums are reduced together
// (reduce16) and their scales divided in one vector. Bit for bit quantize_block's results:
// the same divisions, products and rounding, lane by lane. Block j of x (row j / nb, block
// j % nb) starts at x + 32 j; it is stored at (b * M + r), block-major. 16 rows, one thread,
// a C++ loop (best of 7 x 20,000 calls): 1.35 -> 1.06 us for 576 inputs, 3.6 -> 2.9 us for
// 1536, against quantize_block for each block (four calls in each of a batch-16 step's 30
// blocks: 1.5 us less a block, about 45 us a step); one row of 576, 0.084 -> 0.054 us.
void quantize_rows_simd(const float* x, int64_t M, int64_t K, int8_t* a, float* dx, float* sx) {
  const int64_t nb = K / kQBlock, total = M * nb;
  int64_t r = 0, b = 0, j = 0;
  for (; j + 16 <= total; j += 16) {
    const float* xj = x + j * kQBlock;
    __m512i part[16];
    for (int i = 0; i < 16; ++i) {
      const __m512 x0 = _mm512_loadu_ps(xj + i * kQBlock), x1 = _mm512_loadu_ps(xj + i * kQBlock + 16);
      part[i] = abs_max_bits(x0, x1);
    }
    const __m512i amax_bits = reduce16(part, [](__m512i u, __m512i v) { return _mm512_max_epi32(u, v); });
    const __m512 amax = _mm512_castsi512_ps(amax_bits);
    const __m512 scale = _mm512_div_ps(amax, _mm512_set1_ps(127.0f));
    const __m512 inverse = _mm512_maskz_div_ps(_mm512_cmp_ps_mask(scale, _mm512_setzero_ps(), _CMP_GT_OQ),
                                               _mm512_set1_ps(1.0f), scale);
    const __mmask16 finite = _mm512_cmp_ps_mask(scale, _mm512_set1_ps(INFINITY), _CMP_LT_OQ);
    alignas(64) float inv[16], sc[16];
    _mm512_store_ps(inv, inverse);
    _mm512_store_ps(sc, scale);
    int64_t at[16];  // where block i's results go, (b * M + r)
    for (int i = 0; i < 16; ++i) {
      at[i] = b * M + r;
      const __m512 v = _mm512_set1_ps(inv[i]);
      const __mmask16 keep = (finite >> i) & 1 ? 0xFFFF : 0;  // else codes 0 (quantize_row)
      const __m512i q0 = _mm512_maskz_cvtps_epi32(keep, _mm512_mul_ps(_mm512_loadu_ps(xj + i * kQBlock), v));
      const __m512i q1 =
          _mm512_maskz_cvtps_epi32(keep, _mm512_mul_ps(_mm512_loadu_ps(xj + i * kQBlock + 16), v));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(a + at[i] * kQBlock), _mm512_cvtepi32_epi8(q0));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(a + at[i] * kQBlock + 16), _mm512_cvtepi32_epi8(q1));
      part[i] = _mm512_add_epi32(q0, q1);
      if (++b == nb) b = 0, ++r;
    }
    alignas(64) float sums[16];
    const __m512i code_sums = reduce16(part, [](__m512i u, __m512i v) { return _mm512_add_epi32(u, v); });
    _mm512_store_ps(sums, _mm512_mul_ps(scale, _mm512_cvtepi32_ps(code_sums)));
    for (int i = 0; i < 16; ++i) dx[at[i]] = sc[i], sx[at[i]] = sums[i];
  }
  for (; j < total; ++j) {
    const int64_t at = b * M + r;
    quantize_block(x + j * kQBlock, a + at * kQBlock, dx + at, sx + at);
    if (++b == nb) b = 0, ++r;
  }
}
#endif

}  // namespace

void quantize_rows(const float* x, int64_t M, int64_t K, int8_t* a, float* dx, float* sx, bool simd) {
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
  if (simd) return quantize_rows_simd(x, M, K, a, dx, sx);
#endif
  for (int64_t r = 0; r < M; ++r) quantize_row(x + r * K, K / kQBlock, M, a + r * kQBlock, dx + r, sx + r);
}

namespace {

constexpr int64_t kOut = 16;  // outputs per group: one 512-bit register of int32 / float lanes

float scalar_at(const void* p, int64_t i, bool half) {
  if (half) return static_cast<float>(c10::Half(static_cast<const uint16_t*>(p)[i], c10::Half::from_bits()));
  return static_cast<const float*>(p)[i];
}

// The plain loop: what the vector tile computes, one output at a time, in the same order
// of float operations (fma of the block's integer sum, then fma of the offset).
void plain_group(const int8_t* a, const float* dx, const float* sx, int64_t M, int64_t K, const uint8_t* codes,
                 int64_t block_bytes, const Scales& s, int64_t first, float* y, int64_t n_out, int64_t col) {
  const int64_t nb = K / kQBlock;
  const bool nibbles = block_bytes == 256;
  for (int64_t i = 0; i < kOut && col + i < n_out; ++i)
    for (int64_t r = 0; r < M; ++r) {
      float acc = 0.0f;
      for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* w = codes + b * block_bytes;
        const int8_t* ar = a + (b * M + r) * kQBlock;
        int32_t isum = 0;
        for (int64_t k = 0; k < kQBlock; ++k) {
          int32_t u;
          if (nibbles) {  // chunk k / 8, lane i, byte k % 4, high nibble for k % 8 >= 4
            const uint8_t byte = w[(k / 8) * 64 + 4 * i + k % 4];
            u = (k % 8 < 4) ? (byte & 0x0F) : (byte >> 4);
          } else {
            u = w[(k / 4) * 64 + 4 * i + k % 4];
          }
          isum += u * ar[k];
        }
        const float d = scalar_at(s.d, first + b * kOut + i, s.half);
        const float m = s.m ? scalar_at(s.m, first + b * kOut + i, s.half) : d * s.factor;
        acc = std::fma(static_cast<float>(isum), d * dx[b * M + r], acc);
        acc = std::fma(m, sx[b * M + r], acc);
      }
      y[r * n_out + col + i] = acc;
    }
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
constexpr bool kHaveVnni = true;

inline __m512i broadcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

// 16 scales or offsets, from float32 or float16
template <bool kHalf>
inline __m512 load16(const void* p, int64_t i) {
  if (kHalf) return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(p) + i)));
  return _mm512_loadu_ps(static_cast<const float*>(p) + i);
}

// R rows of activations times one group of 16 outputs. The block's codes are loaded (and
// their nibbles split) once and used for all R rows. The row loops are unrolled so that the
// R sums stay in registers (16 sums, 8 code registers, the scales and temporaries: 31 of
// the 32).
template <int R, bool kNibbles, bool kHalf, bool kStoredM>
void tile(const int8_t* a, const float* dx, const float* sx, int64_t M, int64_t K, const uint8_t* codes, const Scales& s,
          int64_t first, float* y, int64_t n_out, int64_t col) {
  const int64_t nb = K / kQBlock;
  const __m512i low = _mm512_set1_epi8(0x0F);
  const __m512 factor = _mm512_set1_ps(s.factor);
  __m512 acc[R];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  constexpr int64_t kBytes = kNibbles ? 256 : 512;
  for (int64_t b = 0; b < nb; ++b) {
    // ask for the codes 16 blocks ahead now (4 KB of 4-bit codes, 8 KB of 8-bit): the
    // hardware prefetcher alone left the tiles waiting (SmolLM2's 30 blocks: 2.8 -> 2.3 ms
    // per token at batch 1 with 4 blocks ahead), and 4 was still too close: 16 gave 1.12x
    // at batch 1 and 1.06x at batch 16 for Q4_1, 1.14-1.18x at batch 16 for Q8_0 (30 blocks,
    // 15 alternating rounds; 32 ahead measured the same as 16). Non-temporal: each code is
    // used once per step, and 97 MB of them pass through the 32 MB L3, where what the step uses
    // again (the KV cache, the step's own Python objects) would rather stay. `generate`, Q4_1,
    // 10-12 alternating rounds: batch 1 1.03-1.10x and batch 16 1.02-1.05x in four runs (float32,
    // float16, int8 caches) in one period, 1.00x in two runs an hour later: it depends on what
    // else holds the L3, and was never slower.
    for (int64_t line = 0; line < kBytes; line += 64)
      _mm_prefetch(reinterpret_cast<const char*>(codes + (b + 16) * kBytes + line), _MM_HINT_NTA);
    __m512i w[8];  // w[t]: 4 codes per lane, for inputs 4t .. 4t + 3 of the block
    if (kNibbles) {
      const uint8_t* wb = codes + b * 256;
      for (int c = 0; c < 4; ++c) {
        const __m512i v = _mm512_loadu_si512(wb + 64 * c);
        w[2 * c] = _mm512_and_si512(v, low);
        w[2 * c + 1] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
      }
    } else {
      const uint8_t* wb = codes + b * 512;
      for (int t = 0; t < 8; ++t) w[t] = _mm512_loadu_si512(wb + 64 * t);
    }
    const __m512 dv = load16<kHalf>(s.d, first + b * kOut);
    const __m512 mv = kStoredM ? load16<kHalf>(s.m, first + b * kOut) : _mm512_mul_ps(dv, factor);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const int8_t* ar = a + (b * M + r) * kQBlock;
      __m512i s0 = _mm512_setzero_si512(), s1 = _mm512_setzero_si512();  // two chains: half the latency
      for (int t = 0; t < 8; t += 2) {
        s0 = _mm512_dpbusd_epi32(s0, w[t], broadcast4(ar + 4 * t));
        s1 = _mm512_dpbusd_epi32(s1, w[t + 1], broadcast4(ar + 4 * t + 4));
      }
      const __m512 isum = _mm512_cvtepi32_ps(_mm512_add_epi32(s0, s1));
      acc[r] = _mm512_fmadd_ps(isum, _mm512_mul_ps(dv, _mm512_set1_ps(dx[b * M + r])), acc[r]);
      acc[r] = _mm512_fmadd_ps(mv, _mm512_set1_ps(sx[b * M + r]), acc[r]);
    }
  }
  const int64_t left = std::min<int64_t>(kOut, n_out - col);
  const __mmask16 keep = left == kOut ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1);
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) _mm512_mask_storeu_ps(y + r * n_out + col, keep, acc[r]);
}

// Every row for one group: tiles of 16 rows (each block's codes read once for all of them
// at batch 16), then 8, 4, 2, 1.
template <bool kNibbles, bool kHalf, bool kStoredM>
void vector_group(const int8_t* a, const float* dx, const float* sx, int64_t M, int64_t K, const uint8_t* codes,
                  const Scales& s, int64_t first, float* y, int64_t n_out, int64_t col) {
  int64_t r = 0;
#define DOJO_TILE(R) tile<R, kNibbles, kHalf, kStoredM>(a + r * kQBlock, dx + r, sx + r, M, K, codes, s, first, \
                                                       y + r * n_out, n_out, col)
  for (; r + 16 <= M; r += 16) DOJO_TILE(16);
  if (r + 8 <= M) DOJO_TILE(8), r += 8;
  if (r + 4 <= M) DOJO_TILE(4), r += 4;
  if (r + 2 <= M) DOJO_TILE(2), r += 2;
  if (r < M) DOJO_TILE(1);
#undef DOJO_TILE
}

using GroupFn = void (*)(const int8_t*, const float*, const float*, int64_t, int64_t, const uint8_t*, const Scales&,
                         int64_t, float*, int64_t, int64_t);

// The vector kernel for a layout: 4- or 8-bit codes, float16 or float32 scales, offsets stored or d * factor.
GroupFn vector_kernel(bool nibbles, bool half, bool stored_m) {
  static const GroupFn table[8] = {
      vector_group<false, false, false>, vector_group<false, false, true>, vector_group<false, true, false>,
      vector_group<false, true, true>,   vector_group<true, false, false>, vector_group<true, false, true>,
      vector_group<true, true, false>,   vector_group<true, true, true>};
  return table[nibbles * 4 + half * 2 + stored_m];
}
#else
constexpr bool kHaveVnni = false;
#endif

}  // namespace

bool have_vnni() { return kHaveVnni; }

void quant_matmul(const int8_t* a, const float* dx, const float* sx, int64_t M, int64_t K, const uint8_t* codes,
                  int64_t block_bytes, const Scales& s, int64_t n_groups, float* y, int64_t n_out, bool simd) {
  const int64_t nb = K / kQBlock;
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
  const GroupFn vector = simd ? vector_kernel(block_bytes == 256, s.half, s.m != nullptr) : nullptr;
#else
  const void* vector = nullptr;
#endif
  // Groups of 16 outputs are shared out between the threads; a group's codes stay in its
  // thread's cache while every row uses them.
#pragma omp parallel for schedule(static)
  for (int64_t g = 0; g < n_groups; ++g) {
    const uint8_t* cg = codes + g * nb * block_bytes;
    const int64_t first = g * nb * kOut;  // the group's first scale
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
    if (vector) {
      vector(a, dx, sx, M, K, cg, s, first, y, n_out, g * kOut);
      continue;
    }
#endif
    plain_group(a, dx, sx, M, K, cg, block_bytes, s, first, y, n_out, g * kOut);
  }
}

}  // namespace dojo
