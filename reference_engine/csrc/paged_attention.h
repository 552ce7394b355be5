// Attention over the serving engine's paged KV pool, for requests decoding one token each
// (paged_attention.cpp).
#pragma once

#include <torch/extension.h>

// q (requests, H, D) float32; k_pool, v_pool (pool rows, KV, D): float32, float16 or int8
// codes with k_scale, v_scale (pool rows, KV, D / 32) float32 (empty otherwise); rows (requests,
// L) int64: the pool row of each request's slots; lengths (requests,) int64: request b attends
// over its slots 0 .. lengths[b] - 1. Returns (requests, H, D).
torch::Tensor paged_attention(const torch::Tensor& q, const torch::Tensor& k_pool, const torch::Tensor& v_pool,
                              const torch::Tensor& k_scale, const torch::Tensor& v_scale, const torch::Tensor& rows,
                              const torch::Tensor& lengths);
