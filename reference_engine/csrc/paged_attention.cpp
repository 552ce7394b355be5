// Attention for decoding requests whose keys and values live in the serving engine's paged
// pool (`serve/runner.py`), read where they are.
//
// The pool holds one layer's keys (and, apart, its values) for every pool row, a row per
// token of some request, head by head: (KV, rows, D). A request's slot s is the pool row its
// block table gives (`PagedRunner.slots`), so its history is scattered over the pool in
// blocks of consecutive rows. The readable runner gathers each decoding request's rows into
// a padded batch and calls the model's attention on the copy; at batch 16 over 200 slots the
// gather and the padded attention took about half of a Q4_1 serving step. Here each
// request's KV head reads its own rows through its table, one indirection per slot, with the
// static cache's loop (decode_attention.h: one pass over the keys for the query heads that
// share them, the softmax 16 slots at a time, then one pass over the values), so it stores
// and computes exactly what the static cache of that dtype does: float32, float16, or int8
// codes with a float32 scale per 32 values.
//
// Why head by head: a request's rows for one KV head are then D values apart, each block's
// 16 rows one run, as in the static cache; in a (rows, KV, D) pool they were KV * D apart.
// 30 layers' attention at batch 16 over 200 slots took 2.07 ms against 2.78 with int8 codes,
// 2.76 against 3.70 in float16 and 4.06 against 4.63 in float32 (a C++ loop over pools in
// memory, 15 alternating rounds).
#include "paged_attention.h"

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "decode_attention.h"

namespace {

using dojo::kKvBlock;
using dojo::vec16;

// One request's keys or values for one KV head: its slot s is pool row rows[s], whose D
// entries start at data + rows[s] * D and, for int8 codes, whose D / 32 scales start at
// scale + rows[s] * D / 32. The same members as dojo::Slots.
template <typename T>
struct PagedSlots {
  static constexpr bool kCodes = std::is_same_v<T, int8_t>;
  const T* data;         // the pool's rows of this KV head
  const float* scale;    // int8 only: the scales of this KV head
  const int64_t* rows;   // the pool row of each slot
  int64_t n;             // the request's slots: the table ends there, so no prefetch reads past it
  int64_t D;

  vec16 at(int64_t s, int64_t c, int64_t D) const {
    const int64_t i = rows[s] * D + c;
    if constexpr (kCodes) return dojo::load_kv(data + i) * scale[i / kKvBlock];  // D and c: whole blocks
    return dojo::load_kv(data + i);
  }
  void prefetch(int64_t s, int64_t D) const {
    if (s >= n) return;
    const T* p = data + rows[s] * D;
    for (int64_t line = 0; line < D; line += 64 / static_cast<int64_t>(sizeof(T))) __builtin_prefetch(p + line);
    if constexpr (kCodes) __builtin_prefetch(scale + rows[s] * D / kKvBlock);
  }
  PagedSlots from(int64_t first) const { return {data, scale, rows + first, n - first, D}; }
};

// Request b's query heads (H of D floats at q + b * q_stride) attend over its slots 0 ..
// lengths[b] - 1, at pool rows rows[b * L + s] of pools of R rows; out (B, H, D).
template <typename T>
void attend_paged(const float* q, int64_t q_stride, int64_t B, int64_t H, int64_t KV, int64_t R, int64_t D,
                  const T* kp, const T* vp, const float* ks, const float* vs, const int64_t* rows, int64_t L,
                  const int64_t* lengths, float* out) {
  const int64_t group = H / KV;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  // work items as in attend_rows: a request's KV head with the query heads that share it, or
  // one query head each when there are too few of those for the threads (one request: 3 for
  // SmolLM2)
  const int64_t heads_per_item = B * KV >= 8 ? group : 1, items = B * H / heads_per_item;
#pragma omp parallel for schedule(static)
  for (int64_t item = 0; item < items; ++item) {
    const int64_t b = item * heads_per_item / H, head = item * heads_per_item % H, g = head / group;
    const auto slots = [&](const T* pool, const float* scales) {
      return PagedSlots<T>{pool + g * R * D, scales ? scales + g * R * D / kKvBlock : nullptr, rows + b * L,
                           lengths[b], D};
    };
    dojo::attend_group(q + b * q_stride + head * D, slots(kp, ks), slots(vp, vs), lengths[b], heads_per_item,
                       nullptr, scale, out + (b * H + head) * D);
  }
}

}  // namespace

namespace dojo {

void attend_paged_any(const float* q, int64_t q_stride, int64_t B, int64_t H, int64_t D, const torch::Tensor& k_pool,
                      const torch::Tensor& v_pool, const torch::Tensor& k_scale, const torch::Tensor& v_scale,
                      const torch::Tensor& rows, const torch::Tensor& lengths, float* out) {
  const int64_t KV = k_pool.size(0), R = k_pool.size(1), L = rows.size(1);
  const int64_t *prows = rows.data_ptr<int64_t>(), *plen = lengths.data_ptr<int64_t>();
  const auto kind = k_pool.scalar_type();
  if (kind == torch::kChar)
    attend_paged(q, q_stride, B, H, KV, R, D, k_pool.data_ptr<int8_t>(), v_pool.data_ptr<int8_t>(),
                 k_scale.data_ptr<float>(), v_scale.data_ptr<float>(), prows, L, plen, out);
  else if (kind == torch::kHalf)
    attend_paged(q, q_stride, B, H, KV, R, D, k_pool.data_ptr<c10::Half>(), v_pool.data_ptr<c10::Half>(), nullptr,
                 nullptr, prows, L, plen, out);
  else
    attend_paged(q, q_stride, B, H, KV, R, D, k_pool.data_ptr<float>(), v_pool.data_ptr<float>(), nullptr, nullptr,
                 prows, L, plen, out);
}

void check_pool(const torch::Tensor& k_pool, const torch::Tensor& v_pool, const torch::Tensor& k_scale,
                const torch::Tensor& v_scale, int64_t H, int64_t D, const char* op) {
  const auto kind = k_pool.scalar_type();
  TORCH_CHECK((kind == torch::kFloat || kind == torch::kHalf || kind == torch::kChar) && v_pool.scalar_type() == kind &&
                  k_pool.is_cpu() && v_pool.is_cpu() && k_pool.is_contiguous() && v_pool.is_contiguous() &&
                  k_pool.dim() == 3 && v_pool.sizes() == k_pool.sizes(),
              op, ": the pools must be contiguous CPU tensors (KV heads, pool rows, head_dim) of one shape, both "
              "float32, float16 or int8");
  const int64_t KV = k_pool.size(0);
  TORCH_CHECK(k_pool.size(2) == D && KV > 0 && H >= KV && H % KV == 0 && D % kLanes == 0 && D <= 512, op,
              ": the query heads must be a multiple of the pool's KV heads, with head_dim a multiple of 16 (at most "
              "512) in both");
  if (kind == torch::kChar)
    for (const torch::Tensor* t : {&k_scale, &v_scale})
      TORCH_CHECK(t->scalar_type() == torch::kFloat && t->is_cpu() && t->is_contiguous() && t->dim() == 3 &&
                      t->size(0) == KV && t->size(1) == k_pool.size(1) && t->size(2) * kKvBlock == D,
                  op, ": an int8 pool needs float32 scales (KV heads, pool rows, head_dim / 32) for keys and values");
}

void check_tables(const torch::Tensor& rows, const torch::Tensor& lengths, int64_t B, int64_t pool_rows,
                  const char* op) {
  TORCH_CHECK(rows.scalar_type() == torch::kLong && rows.is_cpu() && rows.is_contiguous() && rows.dim() == 2 &&
                  rows.size(0) == B && lengths.scalar_type() == torch::kLong && lengths.is_cpu() &&
                  lengths.is_contiguous() && lengths.dim() == 1 && lengths.size(0) == B,
              op, ": rows must be int64 (requests, slots) and lengths int64 (requests,), on the CPU");
  const int64_t L = rows.size(1);
  const int64_t *prows = rows.data_ptr<int64_t>(), *plen = lengths.data_ptr<int64_t>();
  // every row read must be in the pool: a wrong table would read other memory, not fail.
  // Checked as each request's smallest and largest row, a loop the compiler vectorises (with
  // a check per slot, 16 requests at 200 slots took about 2 us a layer, 60 a step); the slot
  // to name is looked for only when one is out.
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(plen[b] >= 1 && plen[b] <= L, op, ": request ", b, " has length ", plen[b],
                "; a length must be 1 to the table's ", L, " slots");
    const int64_t* row = prows + b * L;
    int64_t lo = row[0], hi = row[0];
    for (int64_t s = 1; s < plen[b]; ++s) lo = std::min(lo, row[s]), hi = std::max(hi, row[s]);
    if (lo >= 0 && hi < pool_rows) continue;
    for (int64_t s = 0; s < plen[b]; ++s)
      TORCH_CHECK(row[s] >= 0 && row[s] < pool_rows, op, ": request ", b, " slot ", s, " is pool row ", row[s],
                  ", outside the pool's ", pool_rows, " rows");
  }
}

}  // namespace dojo

torch::Tensor paged_attention(const torch::Tensor& q, const torch::Tensor& k_pool, const torch::Tensor& v_pool,
                              const torch::Tensor& k_scale, const torch::Tensor& v_scale, const torch::Tensor& rows,
                              const torch::Tensor& lengths) {
  TORCH_CHECK(q.scalar_type() == torch::kFloat && q.is_cpu() && q.is_contiguous() && q.dim() == 3,
              "paged_attention: q must be a contiguous float32 CPU tensor (requests, heads, head_dim)");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  dojo::check_pool(k_pool, v_pool, k_scale, v_scale, H, D, "paged_attention");
  dojo::check_tables(rows, lengths, B, k_pool.size(1), "paged_attention");
  torch::Tensor out = torch::empty_like(q);
  dojo::attend_paged_any(q.data_ptr<float>(), H * D, B, H, D, k_pool, v_pool, k_scale, v_scale, rows, lengths,
                         out.data_ptr<float>());
  return out;
}
