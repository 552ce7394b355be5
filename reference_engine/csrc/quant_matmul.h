// Integer matmuls on quantized weights for decoding (quant_matmul.cpp). See there.
#pragma once

#include <cstdint>

namespace dojo {

constexpr int64_t kQBlock = 32;  // activations and weights share blocks of 32 inputs

// Activations (M, K) float -> int8 codes a, scale dx and sum dx * sum(a) per row and block
// of 32: dx = max|x| / 127, a = round-half-even(x * (1 / dx)). Stored block-major, for the
// tiles (quant_matmul.cpp): a (K / 32, M, 32), dx and sx (K / 32, M).
// simd=false runs the plain loop.
void quantize_rows(const float* x, int64_t M, int64_t K, int8_t* a, float* dx, float* sx, bool simd = true);

// How a quantized weight's scales d and offsets m are stored: 16 values (one per output of a
// group) per group and block of 32 inputs, float32 or float16 (exact for GGUF's fp16
// scales); m == nullptr means m = factor * d (symmetric codes: factor -8 or -128).
struct Scales {
  const void* d;
  const void* m;
  bool half;
  float factor;
};

// y (M, n_out) = dequantized activations x dequantized weights, from the codes of
// quantize_rows and a weight repacked by `compression/kernel_layout.py`:
//   codes (n_out / 16 rounded up, K / 32, 256 or 512) uint8 and scales s (same, K / 32, 16):
//   each weight is d * u + m for its unsigned code u. 256 bytes per block: 4-bit codes,
//   two per byte; 512: 8-bit codes.
// simd=false runs the plain C++ loop (the tests hold the vector path to it).
void quant_matmul(const int8_t* a, const float* dx, const float* sx, int64_t M, int64_t K, const uint8_t* codes,
                  int64_t block_bytes, const Scales& s, int64_t n_groups, float* y, int64_t n_out,
                  bool simd = true);

// True when built with AVX-512 VNNI (else quant_matmul always runs the plain loop).
bool have_vnni();

}  // namespace dojo
