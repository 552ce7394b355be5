// y = x W^T for an x of 1 to 4 rows: the matmul of decoding one token per sequence.
//
// Decoding reads every weight once per step, so this product is limited by how fast the
// weights stream from memory, not by arithmetic. The loop below reads each weight row
// once, front to back, and dots it with all M input rows while it is in registers.
// OpenMP splits the weight rows over the cores; x (at most 4 x a few thousand floats)
// stays in the L1 cache.
//
// Why not F.linear: on some CPUs (AMD EPYC among them) MKL takes a generic path for these
// shapes and streams weights at about a third of the memory bandwidth. This loop,
// vectorised by the compiler for the machine it is built on, reaches almost all of it.
#include <torch/extension.h>

#include <array>
#include <utility>

namespace {

// 16 floats: one 512-bit register (two 256-bit ones on a CPU without AVX-512).
// aligned(4): a weight row need not start on a 64-byte boundary.
typedef float vec16 __attribute__((vector_size(64), aligned(4)));
constexpr int kLanes = 16;

template <int M>
void skinny_rows(const float* x, const float* w, float* y, int64_t n_out, int64_t n_in) {
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < n_out; ++r) {
    const float* row = w + r * n_in;
    vec16 acc[M] = {};  // M accumulators in registers: M is a compile-time constant
    int64_t i = 0;
    for (; i + kLanes <= n_in; i += kLanes) {
      const vec16 wv = *reinterpret_cast<const vec16*>(row + i);  // the weights, read once
      for (int m = 0; m < M; ++m) acc[m] += wv * *reinterpret_cast<const vec16*>(x + m * n_in + i);
    }
    for (int m = 0; m < M; ++m) {
      float sum = 0.0f;
      for (int j = 0; j < kLanes; ++j) sum += acc[m][j];
      for (int64_t k = i; k < n_in; ++k) sum += row[k] * x[m * n_in + k];  // tail of the row
      y[m * n_out + r] = sum;
    }
  }
}

using Kernel = void (*)(const float*, const float*, float*, int64_t, int64_t);
constexpr std::array<Kernel, 4> kKernels = {&skinny_rows<1>, &skinny_rows<2>, &skinny_rows<3>, &skinny_rows<4>};

}  // namespace

// x: (M, n_in), 1 <= M <= 4; weight: (n_out, n_in); both float32, contiguous, on the CPU.
torch::Tensor skinny_matmul(const torch::Tensor& x, const torch::Tensor& weight) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1), "skinny_matmul: shape mismatch");
  TORCH_CHECK(x.scalar_type() == torch::kFloat && weight.scalar_type() == torch::kFloat, "skinny_matmul: float32 only");
  TORCH_CHECK(x.size(0) >= 1 && x.size(0) <= 4, "skinny_matmul: x must have 1 to 4 rows");
  TORCH_CHECK(x.is_contiguous() && weight.is_contiguous() && x.is_cpu() && weight.is_cpu(),
              "skinny_matmul: contiguous CPU tensors only");
  auto y = torch::empty({x.size(0), weight.size(0)}, x.options());
  kKernels[x.size(0) - 1](x.data_ptr<float>(), weight.data_ptr<float>(), y.data_ptr<float>(), weight.size(0),
                          weight.size(1));
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("skinny_matmul", &skinny_matmul, "y = x @ weight.T for an x of 1 to 4 rows");
}
