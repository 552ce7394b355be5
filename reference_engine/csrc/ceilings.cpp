// The loops of ceilings.h. Each thread runs 8 independent chains of the instruction: its
// latency is about 4 cycles here and two issue per cycle, so 8 in flight fill the units.
// With scales, each round of 8 also does the float work the integer matmul does per row
// and block of 32 (quant_matmul.cpp: convert the sum, multiply the two scales, two
// multiply-adds), on registers of its own: what that work costs the dot products when
// nothing waits on memory.
#include "ceilings.h"

#include <immintrin.h>

#include <chrono>

namespace dojo {

namespace {

volatile int32_t g_seed = 1;  // read at run time, so the compiler cannot fold the loops away
volatile float g_sink;

#if defined(__AVX512F__)
template <typename V, typename Step>
double run(int64_t iterations, V start, Step step, int per_instruction, bool scales = false) {
  double total = 0;
#pragma omp parallel reduction(+ : total)
  {
    // eight named sums, so that each lives in a register (an array of them went to memory)
    V a0 = start, a1 = start, a2 = start, a3 = start, a4 = start, a5 = start, a6 = start, a7 = start;
    const __m512i sum = _mm512_set1_epi32(g_seed);
    const __m512 d = _mm512_set1_ps(1e-3f * g_seed), dx = _mm512_set1_ps(0.5f), m = _mm512_set1_ps(-1e-3f);
    // the float sums of 4 rows in turn (one row's would make a chain of 8 cycles a round)
    __m512 acc0 = _mm512_setzero_ps(), acc1 = acc0, acc2 = acc0, acc3 = acc0;
    const auto round = [&](__m512& acc) {
      a0 = step(a0), a1 = step(a1), a2 = step(a2), a3 = step(a3);
      a4 = step(a4), a5 = step(a5), a6 = step(a6), a7 = step(a7);
      if (scales) {  // the float work of one row and block: convert, d * dx, two multiply-adds
        __m512 f = _mm512_cvtepi32_ps(sum), g = _mm512_mul_ps(d, dx);
        asm volatile("" : "+v"(f), "+v"(g));  // (kept from being hoisted out of the loop)
        acc = _mm512_fmadd_ps(m, dx, _mm512_fmadd_ps(f, g, acc));
      }
      // an empty barrier: without it the compiler sums the integer chains in closed form
      asm volatile("" : "+v"(a0), "+v"(a1), "+v"(a2), "+v"(a3), "+v"(a4), "+v"(a5), "+v"(a6), "+v"(a7), "+v"(acc));
    };
    const auto t0 = std::chrono::steady_clock::now();
    for (int64_t i = 0; i < iterations; i += 4) round(acc0), round(acc1), round(acc2), round(acc3);
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    V all[8] = {a0, a1, a2, a3, a4, a5, a6, a7};
    float keep = 0;
    for (const V& v : all) keep += reinterpret_cast<const float*>(&v)[0];
    const __m512 acc = _mm512_add_ps(_mm512_add_ps(acc0, acc1), _mm512_add_ps(acc2, acc3));
    g_sink = keep + reinterpret_cast<const float*>(&acc)[0];
    total += 8.0 * ((iterations + 3) / 4 * 4) * per_instruction / s;
  }
  return total;
}
#endif

}  // namespace

double peak_multiply_adds(bool int8, int64_t iterations, bool scales) {
#if defined(__AVX512F__)
  if (int8) {
#if defined(__AVX512VNNI__)
    const __m512i w = _mm512_set1_epi8(static_cast<char>(g_seed)), x = _mm512_set1_epi8(static_cast<char>(g_seed + 1));
    return run(iterations, _mm512_setzero_si512(), [&](__m512i a) { return _mm512_dpbusd_epi32(a, w, x); }, 64,
               scales);
#else
    return 0.0;
#endif
  }
  const __m512 w = _mm512_set1_ps(1.0f + 1e-7f * g_seed), x = _mm512_set1_ps(1e-7f * g_seed);
  return run(iterations, _mm512_setzero_ps(), [&](__m512 a) { return _mm512_fmadd_ps(a, w, x); }, 16);
#else
  (void)int8, (void)iterations, (void)scales;
  return 0.0;
#endif
}

}  // namespace dojo
