// y = x W^T for a few rows of float32 activations and a weight packed by `pack_weight`
// (decode_kernels.cpp): (n_out / 16 rounded up, K, 16), packed[j][k][i] = W[16 j + i][k].
#pragma once

#include <cstdint>

namespace dojo {

// y (M, n_out) = x (M, K) W^T, with W packed into n_blocks column blocks of 16 outputs.
void packed_matmul(const float* x, int64_t M, int64_t K, const float* packed, int64_t n_blocks, float* y,
                   int64_t n_out);

}  // namespace dojo
