// The loops of ceilings.h. Each thread runs 16 independent chains of the instruction: two
// issue per cycle here, and 8 in flight did not fill the units (this loop with 8 chains gave
// about 980 G int8 multiply-adds/s on 2 threads, with 16 about 1065: 9% more).
// With scales, every 8 of them also do the float work the integer matmul does per row and
// block of 32 (quant_matmul.cpp: convert the sum, multiply the two scales, two
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
    // named sums, so that each lives in a register (an array of them went to memory)
    V a0 = start, a1 = start, a2 = start, a3 = start, a4 = start, a5 = start, a6 = start, a7 = start;
    V b0 = start, b1 = start, b2 = start, b3 = start, b4 = start, b5 = start, b6 = start, b7 = start;
    const __m512i sum = _mm512_set1_epi32(g_seed);
    const __m512 d = _mm512_set1_ps(1e-3f * g_seed), dx = _mm512_set1_ps(0.5f), m = _mm512_set1_ps(-1e-3f);
    // the float sums of 4 rows, two per round of 16 (one row's would make a chain of 8 cycles)
    __m512 acc0 = _mm512_setzero_ps(), acc1 = acc0, acc2 = acc0, acc3 = acc0;
    // the float work of one row and block: convert, d * dx, two multiply-adds
    const auto float_work = [&](__m512& acc) {
      // inputs passed through empty barriers, so that each call converts and multiplies
      // (the compiler otherwise did the work of two calls once, and d * dx as one scalar)
      __m512i s = sum;
      __m512 scale = d;
      asm volatile("" : "+v"(s), "+v"(scale));
      __m512 f = _mm512_cvtepi32_ps(s), g = _mm512_mul_ps(scale, dx);
      asm volatile("" : "+v"(f), "+v"(g));  // (kept from being hoisted out of the loop)
      acc = _mm512_fmadd_ps(m, dx, _mm512_fmadd_ps(f, g, acc));
    };
    const auto round = [&](__m512& acc, __m512& next) {
      a0 = step(a0), a1 = step(a1), a2 = step(a2), a3 = step(a3);
      a4 = step(a4), a5 = step(a5), a6 = step(a6), a7 = step(a7);
      b0 = step(b0), b1 = step(b1), b2 = step(b2), b3 = step(b3);
      b4 = step(b4), b5 = step(b5), b6 = step(b6), b7 = step(b7);
      if (scales) float_work(acc), float_work(next);
      // empty barriers: without them the compiler sums the integer chains in closed form
      asm volatile("" : "+v"(a0), "+v"(a1), "+v"(a2), "+v"(a3), "+v"(a4), "+v"(a5), "+v"(a6), "+v"(a7), "+v"(acc));
      asm volatile("" : "+v"(b0), "+v"(b1), "+v"(b2), "+v"(b3), "+v"(b4), "+v"(b5), "+v"(b6), "+v"(b7), "+v"(next));
    };
    const auto t0 = std::chrono::steady_clock::now();
    for (int64_t i = 0; i < iterations; i += 4) round(acc0, acc1), round(acc2, acc3);
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    V all[16] = {a0, a1, a2, a3, a4, a5, a6, a7, b0, b1, b2, b3, b4, b5, b6, b7};
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
