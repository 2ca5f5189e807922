// What myrnn_fast._C exposes of the CPU implementation besides the ops (which are reached
// through torch.ops): a dispatcher-free cell step, and knobs for tests, benchmarks and `info`.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>
#include <string>
#include <vector>

namespace myrnn_fast::cpu {

// The CPU kernels of the rnn_forward and rnn_cell ops, callable without the dispatcher.
std::tuple<at::Tensor, at::Tensor> rnn_forward(const at::Tensor& x, const at::Tensor& h0, const at::Tensor& w_ih,
                                               const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
                                               const std::optional<at::Tensor>& b_hh,
                                               const std::optional<at::Tensor>& batch_sizes,
                                               c10::string_view nonlinearity);
at::Tensor rnn_cell(const at::Tensor& x, const at::Tensor& h, const at::Tensor& w_ih, const at::Tensor& w_hh,
                    const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh,
                    c10::string_view nonlinearity);

// The instruction set whose kernels run ("baseline", "avx2", "avx512"): the best one this CPU
// supports, or the one named by MYRNN_CPU_ISA when the process started.
std::string cpu_isa();
std::vector<std::string> cpu_isas();  // the ones this CPU and build support
void set_cpu_isa(const std::string& isa);

// How the recurrence runs: "auto" (by hidden and batch size), "kernel" (register-tiled) or "blas".
std::string cpu_path();
void set_cpu_path(const std::string& path);

}  // namespace myrnn_fast::cpu
