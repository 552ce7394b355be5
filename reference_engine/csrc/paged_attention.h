// Attention over the serving engine's paged KV pool, for requests decoding one token each
// (paged_attention.cpp): the torch op, and the loop and checks that decode_kernels.cpp's
// paged block (llama_block_decode_paged) shares.
#pragma once

#include <torch/extension.h>

namespace dojo {

// Request b's H query heads of D floats, at q + b * q_stride, attend over its slots 0 ..
// lengths[b] - 1, found at pool rows rows[b][s] of pools (KV, rows, D); out (B, H, D). The
// pool's dtype picks the loop.
void attend_paged_any(const float* q, int64_t q_stride, int64_t B, int64_t H, int64_t D, const torch::Tensor& k_pool,
                      const torch::Tensor& v_pool, const torch::Tensor& k_scale, const torch::Tensor& v_scale,
                      const torch::Tensor& rows, const torch::Tensor& lengths, float* out);

// Refuse (TORCH_CHECK, naming `op`) pools that are not (KV, rows, D) float32, float16 or
// int8 with its scales for H query heads of D, and tables that read outside the pool.
void check_pool(const torch::Tensor& k_pool, const torch::Tensor& v_pool, const torch::Tensor& k_scale,
                const torch::Tensor& v_scale, int64_t H, int64_t D, const char* op);
void check_tables(const torch::Tensor& rows, const torch::Tensor& lengths, int64_t B, int64_t pool_rows,
                  const char* op);

}  // namespace dojo

// q (requests, H, D) float32; k_pool, v_pool (KV, pool rows, D): float32, float16 or int8
// codes with k_scale, v_scale (KV, pool rows, D / 32) float32 (empty otherwise); rows (requests,
// L) int64: the pool row of each request's slots; lengths (requests,) int64: request b attends
// over its slots 0 .. lengths[b] - 1. Returns (requests, H, D).
torch::Tensor paged_attention(const torch::Tensor& q, const torch::Tensor& k_pool, const torch::Tensor& v_pool,
                              const torch::Tensor& k_scale, const torch::Tensor& v_scale, const torch::Tensor& rows,
                              const torch::Tensor& lengths);
