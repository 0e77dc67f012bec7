// torch binding of the sampling op (sampling.cu): checks the inputs, allocates outputs and scratch from torch's
// allocator (graph-safe: sizes depend on shapes only) and launches on the current CUDA stream.
#include <torch/extension.h>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cmath>
#include <optional>

#include "sampling.h"

namespace {

void check_inputs(const torch::Tensor& logits, double temperature, int64_t top_k, double top_p) {
  TORCH_CHECK(logits.is_cuda(), "sampling: logits must be a CUDA tensor, got one on ", logits.device());
  TORCH_CHECK(logits.scalar_type() == torch::kFloat32, "sampling: logits must be float32, got ", logits.scalar_type());
  TORCH_CHECK(logits.dim() == 2, "sampling: logits must be 2-D [batch, vocab], got ", logits.dim(), " dims");
  TORCH_CHECK(logits.is_contiguous(), "sampling: logits must be contiguous");
  TORCH_CHECK(logits.size(0) >= 1 && logits.size(0) <= 65535, "sampling: batch must be in [1, 65535], got ",
              logits.size(0));
  // 2^24: the fixed-point probability mass of a whole row fits in 64 bits
  TORCH_CHECK(logits.size(1) >= 1 && logits.size(1) < (1 << 24), "sampling: vocab must be in [1, 2^24), got ",
              logits.size(1));
  TORCH_CHECK(std::isfinite(temperature) && temperature >= 0, "sampling: temperature must be >= 0, got ", temperature);
  TORCH_CHECK(top_k >= 0, "sampling: top_k must be >= 0, got ", top_k);
  TORCH_CHECK(top_p > 0 && top_p <= 1, "sampling: top_p must be in (0, 1], got ", top_p);
}

void check_out(const torch::Tensor& out, const torch::Tensor& logits, torch::ScalarType dtype, at::IntArrayRef shape,
               const char* name) {
  TORCH_CHECK(out.device() == logits.device() && out.scalar_type() == dtype && out.sizes() == shape &&
                  out.is_contiguous(),
              "sampling: ", name, " must be a contiguous ", dtype, " tensor of shape ", shape, " on ", logits.device());
}

void launch(const torch::Tensor& logits, double temperature, int64_t top_k, double top_p, uint64_t seed,
            uint64_t offset, bool full_row, int64_t* tokens, bool* kept) {
  const c10::cuda::CUDAGuard guard(logits.device());
  const int batch = logits.size(0), vocab = logits.size(1);
  const int k = top_k >= vocab ? 0 : static_cast<int>(top_k);
  auto scratch = torch::empty({static_cast<int64_t>(tandem::sample_scratch_bytes(batch, vocab, k))},
                              logits.options().dtype(torch::kUInt8));
  const cudaError_t err = tandem::sample_launch(
      logits.data_ptr<float>(), batch, vocab, static_cast<float>(temperature), k, top_p, seed, offset, full_row, tokens,
      kept, scratch.data_ptr(), c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "sampling: kernel launch failed: ", cudaGetErrorString(err));
}

torch::Tensor sample(const torch::Tensor& logits, double temperature, int64_t top_k, double top_p, uint64_t seed,
                     uint64_t offset, bool full_row, std::optional<torch::Tensor> out) {
  check_inputs(logits, temperature, top_k, top_p);
  torch::Tensor tokens = out ? *out : torch::empty({logits.size(0)}, logits.options().dtype(torch::kInt64));
  check_out(tokens, logits, torch::kInt64, {logits.size(0)}, "out");
  launch(logits, temperature, top_k, top_p, seed, offset, full_row, tokens.data_ptr<int64_t>(), nullptr);
  return tokens;
}

torch::Tensor kept_mask(const torch::Tensor& logits, double temperature, int64_t top_k, double top_p, bool full_row,
                        std::optional<torch::Tensor> out) {
  check_inputs(logits, temperature, top_k, top_p);
  torch::Tensor kept = out ? *out : torch::empty(logits.sizes(), logits.options().dtype(torch::kBool));
  check_out(kept, logits, torch::kBool, logits.sizes(), "out");
  launch(logits, temperature, top_k, top_p, 0, 0, full_row, nullptr, kept.data_ptr<bool>());
  return kept;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("sample", &sample,
        "One token per row of logits [B, V] float32 (CUDA): temperature, top-k, top-p, then a draw keyed by "
        "(seed, offset). -> int64 [B]",
        py::arg("logits"), py::arg("temperature"), py::arg("top_k"), py::arg("top_p"), py::arg("seed"),
        py::arg("offset"), py::arg("full_row") = false, py::arg("out") = py::none());
  m.def("kept_mask", &kept_mask, "The set sample() draws from, per row. -> bool [B, V]", py::arg("logits"),
        py::arg("temperature"), py::arg("top_k"), py::arg("top_p"), py::arg("full_row") = false,
        py::arg("out") = py::none());
}
