// The sampling op's launcher: plain C++ (raw pointers, sizes, a stream), so sampling.cu builds with nvcc alone.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

namespace tandem {

// Bytes of device scratch that sample_launch needs: a function of the shapes and top_k only (never of the data),
// so the caller can allocate it before the launch, inside CUDA-graph capture too.
size_t sample_scratch_bytes(int batch, int vocab, int top_k);

// One token per row of logits [batch, vocab] (float32, row-major, on the device), as tandem.runtime.sampling.sample
// draws it: temperature (0: greedy, the lowest index among the largest logits), then top_k (0 or >= vocab: off;
// keeps every logit >= the k-th largest), then top_p (1: off; keeps every token whose probability-ordered
// exclusive prefix mass is < top_p, ties of the last kept value included), then one draw from the renormalized
// softmax of the kept set. Random numbers: Philox4x32-10 keyed by seed, counter (offset, row * vocab + index).
// Writes tokens [batch] int64 and/or kept [batch, vocab] bool (the set the draw is made from); either may be null.
// full_row skips the candidate fast path (for tests: both paths give identical results). Asynchronous on stream.
cudaError_t sample_launch(const float* logits, int batch, int vocab, float temperature, int top_k, double top_p,
                          uint64_t seed, uint64_t offset, bool full_row, int64_t* tokens, bool* kept, void* scratch,
                          cudaStream_t stream);

}  // namespace tandem
