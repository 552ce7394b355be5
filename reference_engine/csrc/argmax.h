// Greedy decoding's pick, compiled (argmax.cpp).
#pragma once

#include <cstdint>

namespace dojo {

// The index of the largest of x's V values, as torch.argmax gives it: the first of equal
// values, and the first NaN where there is one. Greedy decoding's pick (`argmax_rows` in
// decode_kernels.cpp shares a step's rows between the threads): torch.argmax took 0.22 ms
// over 16 x 49152 logits here (one thread, about 3.5 G values/s), 4% of a batch-16 step; 16
// lanes at a time, the rows shared out, it takes a few tens of us.
int64_t argmax_row(const float* x, int64_t V);

}  // namespace dojo
