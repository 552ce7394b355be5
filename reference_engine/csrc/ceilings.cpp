// The loops of ceilings.h. Each thread runs 8 independent chains of the instruction: its
// latency is about 4 cycles here and two issue per cycle, so 8 in flight fill the units.
#include "ceilings.h"

#include <immintrin.h>
#include <omp.h>

#include <chrono>

namespace dojo {

namespace {

volatile int32_t g_seed = 1;  // read at run time, so the compiler cannot fold the loops away
volatile float g_sink;

#if defined(__AVX512F__)
template <typename V, typename Step>
double run(int64_t iterations, V start, Step step, int per_instruction) {
  double total = 0;
#pragma omp parallel reduction(+ : total)
  {
    // eight named sums, so that each lives in a register (an array of them went to memory)
    V a0 = start, a1 = start, a2 = start, a3 = start, a4 = start, a5 = start, a6 = start, a7 = start;
    const auto t0 = std::chrono::steady_clock::now();
    for (int64_t i = 0; i < iterations; ++i) {
      a0 = step(a0), a1 = step(a1), a2 = step(a2), a3 = step(a3);
      a4 = step(a4), a5 = step(a5), a6 = step(a6), a7 = step(a7);
      // an empty barrier: without it the compiler sums the integer chains in closed form
      asm volatile("" : "+v"(a0), "+v"(a1), "+v"(a2), "+v"(a3), "+v"(a4), "+v"(a5), "+v"(a6), "+v"(a7));
    }
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    V all[8] = {a0, a1, a2, a3, a4, a5, a6, a7};
    float keep = 0;
    for (const V& v : all) keep += reinterpret_cast<const float*>(&v)[0];
    g_sink = keep;
    total += 8.0 * iterations * per_instruction / s;
  }
  return total;
}
#endif

}  // namespace

double peak_multiply_adds(bool int8, int64_t iterations) {
#if defined(__AVX512F__)
  if (int8) {
#if defined(__AVX512VNNI__)
    const __m512i w = _mm512_set1_epi8(static_cast<char>(g_seed)), x = _mm512_set1_epi8(static_cast<char>(g_seed + 1));
    return run(iterations, _mm512_setzero_si512(), [&](__m512i a) { return _mm512_dpbusd_epi32(a, w, x); }, 64);
#else
    return 0.0;
#endif
  }
  const __m512 w = _mm512_set1_ps(1.0f + 1e-7f * g_seed), x = _mm512_set1_ps(1e-7f * g_seed);
  return run(iterations, _mm512_setzero_ps(), [&](__m512 a) { return _mm512_fmadd_ps(a, w, x); }, 16);
#else
  (void)int8, (void)iterations;
  return 0.0;
#endif
}

}  // namespace dojo
