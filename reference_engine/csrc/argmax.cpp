// The index of a row's largest value, as torch.argmax gives it (argmax.h).
#include "argmax.h"

#include <immintrin.h>

#include <algorithm>
#include <cmath>

#include "vec16.h"

namespace dojo {

int64_t argmax_row(const float* x, int64_t V) {
  const auto first_nan = [&] { return std::find_if(x, x + V, [](float v) { return std::isnan(v); }) - x; };
  int64_t i = 0, best = 0;
#if defined(__AVX512F__)
  if (V >= kLanes) {
    __m512 top = _mm512_loadu_ps(x);
    __m512i at = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), where = at;
    const __m512i step = _mm512_set1_epi32(kLanes);
    __mmask16 nan = _mm512_cmp_ps_mask(top, top, _CMP_UNORD_Q);
    for (i = kLanes; i + kLanes <= V; i += kLanes) {
      const __m512 v = _mm512_loadu_ps(x + i);
      at = _mm512_add_epi32(at, step);
      const __mmask16 higher = _mm512_cmp_ps_mask(v, top, _CMP_GT_OQ);  // strictly: a lane keeps its first
      top = _mm512_mask_mov_ps(top, higher, v);
      where = _mm512_mask_mov_epi32(where, higher, at);
      nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    }
    if (nan) return first_nan();
    const float m = _mm512_reduce_max_ps(top);
    best = _mm512_mask_reduce_min_epi32(_mm512_cmp_ps_mask(top, _mm512_set1_ps(m), _CMP_EQ_OQ), where);
  }
#endif
  for (; i < V; ++i) {  // the tail (and everything without AVX-512)
    if (std::isnan(x[i])) return first_nan();
    if (x[i] > x[best]) best = i;
  }
  return best;
}

}  // namespace dojo
