// What myrnn_fast._C exposes of the CUDA implementation besides the ops (which are reached
// through torch.ops): dispatcher-free entries for eager calls, and knobs for tests.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string>
#include <tuple>

namespace myrnn_fast::cuda {

// The CUDA kernels of the rnn_forward and rnn_cell ops, callable without the dispatcher.
std::tuple<at::Tensor, at::Tensor> rnn_forward(const at::Tensor& x, const at::Tensor& h0, const at::Tensor& w_ih,
                                               const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
                                               const std::optional<at::Tensor>& b_hh,
                                               const std::optional<at::Tensor>& batch_sizes,
                                               c10::string_view nonlinearity);
at::Tensor rnn_cell(const at::Tensor& x, const at::Tensor& h, const at::Tensor& w_ih, const at::Tensor& w_hh,
                    const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh,
                    c10::string_view nonlinearity);

// How the recurrence runs: "auto" (persistent where it fits), "registers" or "shared" (the
// persistent kernels with W_hh in registers or in shared memory), or "gemm" (per-step cuBLAS).
std::string cuda_path();
void set_cuda_path(const std::string& path);
// Batch rows per block of the persistent kernels: 1, 2, 4 or 8 forced, or 0 to choose (tests).
int cuda_rows_per_block();
void set_cuda_rows_per_block(int rows);

}  // namespace myrnn_fast::cuda
