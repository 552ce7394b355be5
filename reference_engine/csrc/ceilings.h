// This CPU's arithmetic ceilings, measured (ceilings.cpp): the roofline that `bench --roofline`
// sets the decode step against.
#pragma once

#include <cstdint>

namespace dojo {

// Multiply-adds per second on every OpenMP thread together, from loops that do nothing but
// the instruction with enough independent sums to keep every unit busy: int8 = AVX-512 VNNI
// vpdpbusd (64 per instruction, the integer matmul's), else float32 FMA (16 per
// instruction, the float32 decode kernel's). 0 where the build has no AVX-512 (VNNI for
// int8). scales (int8 only): every 8 dot products also do the integer matmul's float work
// for one row and block.
double peak_multiply_adds(bool int8, int64_t iterations, bool scales = false);

}  // namespace dojo
