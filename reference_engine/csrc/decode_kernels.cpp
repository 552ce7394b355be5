// Compiled CPU kernels for decoding: a matmul for a few rows of activations, and a whole
// Llama block for one new token per sequence, in one call.
//
// Why they exist. Decoding one token multiplies a few rows of activations by every weight
// matrix, so its speed is the speed of streaming the weights from memory. Two things keep
// plain PyTorch from that speed on a small CPU:
//   - MKL (behind F.linear) takes a generic path for these skinny shapes and streams the
//     weights at a third of the memory bandwidth on some CPUs (AMD EPYC among them);
//   - a block is about 35 small operators (norms, RoPE, cache writes, attention, the
//     SwiGLU product), each a few microseconds of Python and dispatch: for SmolLM2's 30
//     blocks that is several milliseconds per token, a third of the time the weights take.
// `packed_linear` answers the first: each weight is copied once into column blocks of 16
// outputs (`pack_weight`), so the inner loop reads it front to back and multiplies one
// 16-float vector of weights by up to 8 activation rows held in registers
// (packed_matmul.cpp).
// `llama_block_decode` answers the second: the math of `Block.forward` (model.py) for
// T = 1, written out in one function (its row-wise steps and cache writes are in
// block_steps.h). Its matmuls take float32 packed weights or quantized ones
// (`quant_matmul.cpp`, integer dot products). Tests hold all of it to the PyTorch path.
#include <torch/extension.h>

#include "argmax.h"
#include "block_steps.h"
#include "ceilings.h"
#include "decode_attention.h"
#include "packed_matmul.h"
#include "paged_attention.h"
#include "quant_matmul.h"
#include "vec16.h"

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

using dojo::cache_and_attend;
using dojo::for_rows;
using dojo::kLanes;
using dojo::rms_norm;
using dojo::rotate;
using dojo::scratch;
using dojo::store_rows;
using dojo::swiglu;

// what: the tensor's name, in parts (joined only when the check fails)
template <typename... Name>
void check_float_cpu(const torch::Tensor& t, const Name&... what) {
  TORCH_CHECK(t.scalar_type() == torch::kFloat && t.is_cpu() && t.is_contiguous(), what...,
              " must be a contiguous float32 CPU tensor");
}

// A quantized weight (quant_matmul.h) with n_in inputs and n_out outputs: codes, scales d
// (float32 or float16) and offsets m (like d), or m a one-element float32 factor (m = factor * d).
void check_quantized(const torch::Tensor& codes, const torch::Tensor& d, const torch::Tensor& m, int64_t n_in,
                     int64_t n_out, const char* who) {
  TORCH_CHECK(codes.scalar_type() == torch::kByte && codes.is_cpu() && codes.is_contiguous() && codes.dim() == 3 &&
                  (codes.size(2) == 256 || codes.size(2) == 512),
              who, ": codes must be contiguous uint8 (groups, blocks, 256 or 512)");
  TORCH_CHECK((d.scalar_type() == torch::kFloat || d.scalar_type() == torch::kHalf) && d.is_cpu() && d.is_contiguous(),
              who, ": scales must be contiguous float32 or float16");
  const bool factor = m.numel() == 1 && m.scalar_type() == torch::kFloat && m.is_cpu();
  TORCH_CHECK(factor || (m.scalar_type() == d.scalar_type() && m.is_cpu() && m.is_contiguous() && m.sizes() == d.sizes()),
              who, ": offsets must be like the scales, or one float32 factor");
  TORCH_CHECK(n_in % dojo::kQBlock == 0 && codes.size(1) * dojo::kQBlock == n_in && codes.size(0) * 16 >= n_out &&
                  codes.size(0) * 16 < n_out + 16 && d.dim() == 3 && d.size(0) == codes.size(0) &&
                  d.size(1) == codes.size(1) && d.size(2) == 16,
              who, ": a quantized weight of shape ", codes.sizes(), " does not fit ", n_in, " inputs and ", n_out,
              " outputs");
}

dojo::Scales scales_of(const torch::Tensor& d, const torch::Tensor& m) {
  const bool factor = m.numel() == 1;
  return {d.data_ptr(), factor ? nullptr : m.data_ptr(), d.scalar_type() == torch::kHalf,
          factor ? *m.data_ptr<float>() : 0.0f};
}

// A weight of llama_block_decode: [packed] (float32, pack_weight) or [codes, d, m]
// (quantized, the layout of quant_matmul.h), checked against its inputs and outputs.
struct Weight {
  const std::vector<torch::Tensor>& parts;
  int64_t n_in, n_out;

  // op: the calling op's name, for the messages
  Weight(const std::vector<torch::Tensor>& p, int64_t in, int64_t out, const char* op)
      : parts(p), n_in(in), n_out(out) {
    if (parts.size() == 1) {
      const torch::Tensor& w = parts[0];
      check_float_cpu(w, op, ": a packed weight");
      TORCH_CHECK(w.dim() == 3 && w.size(1) == n_in && w.size(0) * kLanes >= n_out, op, ": a packed weight has shape ",
                  w.sizes(), " for ", n_in, " inputs and ", n_out, " outputs");
    } else {
      TORCH_CHECK(parts.size() == 3, op, ": a weight is [packed] or [codes, d, m]");
      check_quantized(parts[0], parts[1], parts[2], n_in, n_out, op);
    }
  }

  // y (M, n_out) = x (M, n_in) W^T
  void apply(const float* x, int64_t M, float* y) const {
    if (parts.size() == 1) {
      dojo::packed_matmul(x, M, n_in, parts[0].data_ptr<float>(), parts[0].size(0), y, n_out);
      return;
    }
    // the activations' codes, scales and sums, in buffers kept from call to call (as scratch)
    const int64_t nb = n_in / dojo::kQBlock;
    thread_local std::vector<int8_t> a;
    thread_local std::vector<float> dx, sx;
    if (static_cast<int64_t>(a.size()) < M * n_in) a.resize(M * n_in), dx.resize(M * nb), sx.resize(M * nb);
    dojo::quantize_rows(x, M, n_in, a.data(), dx.data(), sx.data());
    dojo::quant_matmul(a.data(), dx.data(), sx.data(), M, n_in, parts[0].data_ptr<uint8_t>(), parts[0].size(2),
                       scales_of(parts[1], parts[2]), parts[0].size(0), y, n_out);
  }
};

// A block's four weights, checked against its shapes: d inputs, H query heads and KV key
// and value heads of D, and the MLP's width F (read off w2: its inputs).
struct BlockWeights {
  int64_t F;
  Weight wqkv, wo, w13, w2;

  BlockWeights(const std::vector<torch::Tensor>& wqkv_parts, const std::vector<torch::Tensor>& wo_parts,
               const std::vector<torch::Tensor>& w13_parts, const std::vector<torch::Tensor>& w2_parts, int64_t d,
               int64_t H, int64_t KV, int64_t D, const char* op)
      : F(mlp_width(w2_parts, op)),
        wqkv(wqkv_parts, d, (H + 2 * KV) * D, op),
        wo(wo_parts, H * D, d, op),
        w13(w13_parts, d, 2 * F, op),
        w2(w2_parts, F, d, op) {}

  static int64_t mlp_width(const std::vector<torch::Tensor>& w2_parts, const char* op) {
    TORCH_CHECK(w2_parts.size() == 1 || w2_parts.size() == 3, op, ": a weight is [packed] or [codes, d, m]");
    return w2_parts.size() == 1 ? w2_parts[0].size(1) : w2_parts[0].size(1) * dojo::kQBlock;
  }
};

// ---- llama_block_decode ----------------------------------------------------------------

// The block around its attention, for one new token per row of x (B, d), in place: norm,
// Q/K/V, RoPE on Q and K, then attend(qkv, att) (store each row's new key and value, and
// attention over its slots: the static cache's or the serving pool's), the output
// projection and residual, then norm, [gate; up], silu(gate) * up, down and residual.
template <typename Attend>
void run_block(float* px, int64_t B, int64_t d, const float* attn_norm, const float* ffn_norm, float eps,
               const BlockWeights& w, int64_t H, int64_t KV, int64_t D, const float* pcos, const float* psin,
               bool adjacent, Attend attend) {
  const int64_t qkv_width = (H + 2 * KV) * D, F = w.F;
  // the block's intermediate rows, in one buffer kept from call to call (see scratch)
  float* const h = scratch(B * (d + qkv_width + H * D + 2 * F + d + F));
  float *const qkv = h + B * d, *const att = qkv + B * qkv_width, *const up = att + B * H * D, *const out = up + B * 2 * F,
               *const act = out + B * d;

  rms_norm(px, attn_norm, eps, B, d, h);
  w.wqkv.apply(h, B, qkv);
  for_rows(B, [&](int64_t b) {
    float* row = qkv + b * qkv_width;
    for (int64_t head = 0; head < H + KV; ++head) rotate(row + head * D, pcos + b * D, psin + b * D, D, adjacent);
  });
  attend(static_cast<const float*>(qkv), att);
  w.wo.apply(att, B, out);
  for (int64_t i = 0; i < B * d; ++i) px[i] += out[i];

  rms_norm(px, ffn_norm, eps, B, d, h);
  w.w13.apply(h, B, up);
  swiglu(up, B, F, act);
  w.w2.apply(act, B, out);
  for (int64_t i = 0; i < B * d; ++i) px[i] += out[i];
}

}  // namespace

torch::Tensor pack_weight(const torch::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2, "pack_weight: weight must be 2-D (n_out, n_in)");
  check_float_cpu(weight, "pack_weight: weight");
  const int64_t n_out = weight.size(0), K = weight.size(1), n_blocks = (n_out + kLanes - 1) / kLanes;
  auto padded = torch::zeros({n_blocks * kLanes, K}, weight.options());
  padded.narrow(0, 0, n_out).copy_(weight);
  return padded.view({n_blocks, kLanes, K}).transpose(1, 2).contiguous();  // (blocks, K, 16)
}

// x (M, K) float32 contiguous; packed from pack_weight of a weight with n_out rows.
torch::Tensor packed_linear(const torch::Tensor& x, const torch::Tensor& packed, int64_t n_out) {
  TORCH_CHECK(x.dim() == 2 && packed.dim() == 3 && x.size(1) == packed.size(1) && packed.size(2) == kLanes &&
                  n_out <= packed.size(0) * kLanes,
              "packed_linear: shapes do not match (x ", x.sizes(), ", packed ", packed.sizes(), ")");
  check_float_cpu(x, "packed_linear: x");
  check_float_cpu(packed, "packed_linear: packed weight");
  auto y = torch::empty({x.size(0), n_out}, x.options());
  dojo::packed_matmul(x.data_ptr<float>(), x.size(0), x.size(1), packed.data_ptr<float>(), packed.size(0),
                      y.data_ptr<float>(), n_out);
  return y;
}

// One Llama block (RMSNorm, attention with RoPE and grouped KV heads, RMSNorm, SwiGLU MLP)
// for one new token in each of B rows, all written into cache slot `slot`.
//   x: (B, d) the residual stream, updated in place.
//   w*: packed weights (`pack_weight`) of wqkv (rows [Q; K; V]), wo, w13 (rows [gate; up]), w2.
//   k_cache, v_cache: (batch >= B, KV, max_len, D), float32, float16 or int8; cos, sin: (B, D)
//   at each row's position.
//   key_valid: (B, >= slot + 1) bool, false for padding slots; or an empty tensor (all valid).
//   k_scale, v_scale: an int8 cache's float32 scales (batch, KV, max_len, D / 32) (kv_cache.py's
//   Int8KVCache); empty tensors for a float cache.
void llama_block_decode(torch::Tensor x, const torch::Tensor& attn_norm, const torch::Tensor& ffn_norm, double eps,
                        const std::vector<torch::Tensor>& wqkv_parts, const std::vector<torch::Tensor>& wo_parts,
                        const std::vector<torch::Tensor>& w13_parts, const std::vector<torch::Tensor>& w2_parts,
                        torch::Tensor k_cache, torch::Tensor v_cache, int64_t slot, const torch::Tensor& cos,
                        const torch::Tensor& sin, const torch::Tensor& key_valid, int64_t n_heads, bool adjacent,
                        const torch::Tensor& k_scale, const torch::Tensor& v_scale) {
  const std::initializer_list<const torch::Tensor*> all = {&x, &attn_norm, &ffn_norm, &cos, &sin};
  for (const torch::Tensor* t : all) check_float_cpu(*t, "llama_block_decode: every tensor");
  const auto kind = k_cache.scalar_type();
  TORCH_CHECK((kind == torch::kFloat || kind == torch::kHalf || kind == torch::kChar) &&
                  v_cache.scalar_type() == kind && k_cache.is_cpu() && v_cache.is_cpu() && k_cache.is_contiguous() &&
                  v_cache.is_contiguous(),
              "llama_block_decode: the caches must be contiguous CPU tensors, both float32, float16 or int8");
  const int64_t B = x.size(0), d = x.size(1), KV = k_cache.size(1), L = k_cache.size(2), D = k_cache.size(3);
  const bool codes = kind == torch::kChar;
  if (codes) {
    for (const torch::Tensor* t : {&k_scale, &v_scale}) check_float_cpu(*t, "llama_block_decode: an int8 cache's scales");
    TORCH_CHECK(D % dojo::kKvBlock == 0 && k_scale.dim() == 4 && k_scale.size(0) == k_cache.size(0) &&
                    k_scale.size(1) == KV && k_scale.size(2) == L && k_scale.size(3) * dojo::kKvBlock == D &&
                    v_scale.sizes() == k_scale.sizes(),
                "llama_block_decode: an int8 cache needs scales (batch, KV, slots, D / 32) for keys and values");
  }
  const int64_t H = n_heads;
  const BlockWeights w(wqkv_parts, wo_parts, w13_parts, w2_parts, d, H, KV, D, "llama_block_decode");
  TORCH_CHECK(x.dim() == 2 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes() && H % KV == 0 && D <= 512 &&
                  D % kLanes == 0 && slot < L && k_cache.size(0) >= B && cos.size(0) == B && cos.size(1) == D &&
                  sin.sizes() == cos.sizes() && attn_norm.numel() == d && ffn_norm.numel() == d,
              "llama_block_decode: inconsistent shapes");
  const bool masked = key_valid.defined() && key_valid.numel() > 0;
  TORCH_CHECK(!masked || (key_valid.scalar_type() == torch::kBool && key_valid.size(0) == B &&
                          key_valid.size(1) > slot && key_valid.stride(1) == 1),
              "llama_block_decode: key_valid must be bool (B, > slot)");
  const int64_t row_stride = k_cache.stride(0), head_stride = k_cache.stride(1);  // slot stride is D
  const bool* valid = masked ? key_valid.data_ptr<bool>() : nullptr;
  const int64_t valid_stride = masked ? key_valid.stride(0) : 0;
  // K and V into the cache at `slot`, then softmax(q k^T / sqrt(D)) v over slots [0, slot]
  const auto attend = [&](const float* qkv, float* att) {
    if (codes)
      cache_and_attend(qkv, B, H, KV, D, k_cache.data_ptr<int8_t>(), v_cache.data_ptr<int8_t>(),
                       k_scale.data_ptr<float>(), v_scale.data_ptr<float>(), row_stride, head_stride, slot, valid,
                       valid_stride, att);
    else if (kind == torch::kHalf)
      cache_and_attend(qkv, B, H, KV, D, k_cache.data_ptr<c10::Half>(), v_cache.data_ptr<c10::Half>(), nullptr,
                       nullptr, row_stride, head_stride, slot, valid, valid_stride, att);
    else
      cache_and_attend(qkv, B, H, KV, D, k_cache.data_ptr<float>(), v_cache.data_ptr<float>(), nullptr, nullptr,
                       row_stride, head_stride, slot, valid, valid_stride, att);
  };
  run_block(x.data_ptr<float>(), B, d, attn_norm.data_ptr<float>(), ffn_norm.data_ptr<float>(), eps, w, H, KV, D,
            cos.data_ptr<float>(), sin.data_ptr<float>(), adjacent, attend);
}

// The same block for one new token per request of the serving engine (serve/runner.py),
// keys and values in its paged pool: request b's new key and value go to pool row
// new_rows[b], then it attends over pool rows rows[b][0 .. lengths[b] - 1], the last of which
// is new_rows[b] (paged_attention.cpp).
//   k_pool, v_pool: (KV, pool rows, D), float32, float16 or int8 with k_scale, v_scale
//   (KV, pool rows, D / 32) (empty for a float pool); new_rows (B,), rows (B, L), lengths (B,):
//   int64; the rest as for llama_block_decode.
void llama_block_decode_paged(torch::Tensor x, const torch::Tensor& attn_norm, const torch::Tensor& ffn_norm,
                              double eps, const std::vector<torch::Tensor>& wqkv_parts,
                              const std::vector<torch::Tensor>& wo_parts, const std::vector<torch::Tensor>& w13_parts,
                              const std::vector<torch::Tensor>& w2_parts, torch::Tensor k_pool, torch::Tensor v_pool,
                              torch::Tensor k_scale, torch::Tensor v_scale, const torch::Tensor& new_rows,
                              const torch::Tensor& rows, const torch::Tensor& lengths, const torch::Tensor& cos,
                              const torch::Tensor& sin, int64_t n_heads, bool adjacent) {
  const char* op = "llama_block_decode_paged";
  const std::initializer_list<const torch::Tensor*> all = {&x, &attn_norm, &ffn_norm, &cos, &sin};
  for (const torch::Tensor* t : all) check_float_cpu(*t, "llama_block_decode_paged: every tensor");
  TORCH_CHECK(x.dim() == 2 && cos.dim() == 2 && cos.size(0) == x.size(0) && sin.sizes() == cos.sizes() &&
                  attn_norm.numel() == x.size(1) && ffn_norm.numel() == x.size(1),
              "llama_block_decode_paged: inconsistent shapes");
  const int64_t B = x.size(0), d = x.size(1), H = n_heads, D = cos.size(1);
  dojo::check_pool(k_pool, v_pool, k_scale, v_scale, H, D, op);
  const int64_t KV = k_pool.size(0), R = k_pool.size(1);
  dojo::check_tables(rows, lengths, B, R, op);
  TORCH_CHECK(new_rows.scalar_type() == torch::kLong && new_rows.is_cpu() && new_rows.is_contiguous() &&
                  new_rows.dim() == 1 && new_rows.size(0) == B,
              "llama_block_decode_paged: new_rows must be int64 (requests,) on the CPU");
  const int64_t *pnew = new_rows.data_ptr<int64_t>(), *prows = rows.data_ptr<int64_t>(),
                *plen = lengths.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    // each request writes its own row, the one it then reads as its newest: two requests
    // writing one row would race, and a row not read would leave the step without its token
    TORCH_CHECK(pnew[b] == prows[b * rows.size(1) + plen[b] - 1], "llama_block_decode_paged: request ", b,
                " writes pool row ", pnew[b], " but its last slot is row ", prows[b * rows.size(1) + plen[b] - 1]);
    for (int64_t c = 0; c < b; ++c)
      TORCH_CHECK(pnew[c] != pnew[b], "llama_block_decode_paged: requests ", c, " and ", b, " both write pool row ",
                  pnew[b]);
  }
  const BlockWeights w(wqkv_parts, wo_parts, w13_parts, w2_parts, d, H, KV, D, op);
  const auto kind = k_pool.scalar_type();
  const auto attend = [&](const float* qkv, float* att) {
    if (kind == torch::kChar)
      store_rows(qkv, B, H, KV, R, D, k_pool.data_ptr<int8_t>(), v_pool.data_ptr<int8_t>(), k_scale.data_ptr<float>(),
                 v_scale.data_ptr<float>(), pnew);
    else if (kind == torch::kHalf)
      store_rows(qkv, B, H, KV, R, D, k_pool.data_ptr<c10::Half>(), v_pool.data_ptr<c10::Half>(), nullptr, nullptr,
                 pnew);
    else
      store_rows(qkv, B, H, KV, R, D, k_pool.data_ptr<float>(), v_pool.data_ptr<float>(), nullptr, nullptr, pnew);
    dojo::attend_paged_any(qkv, (H + 2 * KV) * D, B, H, D, k_pool, v_pool, k_scale, v_scale, rows, lengths, att);
  };
  run_block(x.data_ptr<float>(), B, d, attn_norm.data_ptr<float>(), ffn_norm.data_ptr<float>(), eps, w, H, KV, D,
            cos.data_ptr<float>(), sin.data_ptr<float>(), adjacent, attend);
}

torch::Tensor argmax_rows(const torch::Tensor& logits) {
  check_float_cpu(logits, "argmax_rows: logits");
  TORCH_CHECK(logits.dim() == 2 && logits.size(1) > 0, "argmax_rows: logits must be (rows, vocabulary)");
  const int64_t B = logits.size(0), V = logits.size(1);
  auto out = torch::empty({B}, logits.options().dtype(torch::kLong));
  const float* x = logits.data_ptr<float>();
  int64_t* o = out.data_ptr<int64_t>();
#pragma omp parallel for schedule(static) if (B >= 2)
  for (int64_t r = 0; r < B; ++r) o[r] = dojo::argmax_row(x + r * V, V);
  return out;
}

// Activations (M, K) float32 -> codes int8 (K / 32, M, 32), dx and sx (K / 32, M): the
// block-major layout quant_matmul reads.
std::vector<torch::Tensor> quantize_blocks_major(const torch::Tensor& x, bool simd) {
  check_float_cpu(x, "quantize_rows: x");
  TORCH_CHECK(x.dim() == 2 && x.size(1) % dojo::kQBlock == 0, "quantize_rows: x must be (rows, a multiple of 32)");
  const int64_t M = x.size(0), nb = x.size(1) / dojo::kQBlock;
  auto a = torch::empty({nb, M, dojo::kQBlock}, x.options().dtype(torch::kChar));
  auto dx = torch::empty({nb, M}, x.options()), sx = torch::empty_like(dx);
  dojo::quantize_rows(x.data_ptr<float>(), M, x.size(1), a.data_ptr<int8_t>(), dx.data_ptr<float>(),
                      sx.data_ptr<float>(), simd);
  return {a, dx, sx};
}

// The same, row by row: codes int8 (M, K), dx and sx (M, K / 32).
std::vector<torch::Tensor> quantize_rows(const torch::Tensor& x, bool simd) {
  const auto parts = quantize_blocks_major(x, simd);
  return {parts[0].permute({1, 0, 2}).reshape({x.size(0), x.size(1)}), parts[1].t().contiguous(),
          parts[2].t().contiguous()};
}

// y (M, n_out) = x (M, K) W^T for a quantized W (quant_matmul.h): x is quantized per row
// and block of 32 first. simd=false runs the plain loop.
torch::Tensor quant_linear(const torch::Tensor& x, const torch::Tensor& codes, const torch::Tensor& d,
                           const torch::Tensor& m, int64_t n_out, bool simd) {
  check_float_cpu(x, "quant_linear: x");
  TORCH_CHECK(x.dim() == 2, "quant_linear: x must be 2-D");
  check_quantized(codes, d, m, x.size(1), n_out, "quant_linear");
  const auto parts = quantize_blocks_major(x, simd);
  auto y = torch::empty({x.size(0), n_out}, x.options());
  dojo::quant_matmul(parts[0].data_ptr<int8_t>(), parts[1].data_ptr<float>(), parts[2].data_ptr<float>(), x.size(0),
                     x.size(1), codes.data_ptr<uint8_t>(), codes.size(2), scales_of(d, m), codes.size(0),
                     y.data_ptr<float>(), n_out, simd);
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("pack_weight", &pack_weight, "copy a weight (n_out, n_in) into column blocks of 16 outputs");
  m.def("packed_linear", &packed_linear, "y = x @ weight.T with the weight from pack_weight");
  m.def("llama_block_decode", &llama_block_decode, "one Llama block for one new token per row, in place",
        pybind11::arg("x"), pybind11::arg("attn_norm"), pybind11::arg("ffn_norm"), pybind11::arg("eps"),
        pybind11::arg("wqkv"), pybind11::arg("wo"), pybind11::arg("w13"), pybind11::arg("w2"), pybind11::arg("k_cache"),
        pybind11::arg("v_cache"), pybind11::arg("slot"), pybind11::arg("cos"), pybind11::arg("sin"),
        pybind11::arg("key_valid"), pybind11::arg("n_heads"), pybind11::arg("adjacent"),
        pybind11::arg("k_scale") = torch::Tensor(), pybind11::arg("v_scale") = torch::Tensor());
  m.def("quantize_rows", &quantize_rows, "int8 codes, scale and scaled sum per row and block of 32",
        pybind11::arg("x"), pybind11::arg("simd") = true);
  m.def("quant_linear", &quant_linear, "y = x @ W.T for a quantized W, with int8 activations per block of 32",
        pybind11::arg("x"), pybind11::arg("codes"), pybind11::arg("d"), pybind11::arg("m"), pybind11::arg("n_out"),
        pybind11::arg("simd") = true);
  m.def("llama_block_decode_paged", &llama_block_decode_paged, "one Llama block for one new token per request, "
        "keys and values in a paged pool, in place", pybind11::arg("x"), pybind11::arg("attn_norm"),
        pybind11::arg("ffn_norm"), pybind11::arg("eps"), pybind11::arg("wqkv"), pybind11::arg("wo"),
        pybind11::arg("w13"), pybind11::arg("w2"), pybind11::arg("k_pool"), pybind11::arg("v_pool"),
        pybind11::arg("k_scale"), pybind11::arg("v_scale"), pybind11::arg("new_rows"), pybind11::arg("rows"),
        pybind11::arg("lengths"), pybind11::arg("cos"), pybind11::arg("sin"), pybind11::arg("n_heads"),
        pybind11::arg("adjacent"));
  m.def("paged_attention", &paged_attention, "attention of one new token per request over a paged KV pool, "
        "read in place through each request's pool rows", pybind11::arg("q"), pybind11::arg("k_pool"),
        pybind11::arg("v_pool"), pybind11::arg("k_scale"), pybind11::arg("v_scale"), pybind11::arg("rows"),
        pybind11::arg("lengths"));
  m.def("argmax_rows", &argmax_rows, "the index of each row's largest value, as torch.argmax");
  m.def("have_vnni", &dojo::have_vnni, "built with AVX-512 VNNI");
  m.def("peak_multiply_adds", &dojo::peak_multiply_adds, "multiply-adds per second on every thread: int8 (VNNI) or "
        "float32 (FMA); 0 without AVX-512; scales: with the integer matmul's float work per 8 dot products",
        pybind11::arg("int8"), pybind11::arg("iterations"), pybind11::arg("scales") = false);
}
