// What myrnn_fast._C exposes of the CPU implementation besides the ops (which are reached
// through torch.ops): dispatcher-free entries for eager calls, and the instruction sets.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>
#include <string>
#include <vector>

namespace myrnn_fast::cpu {

// The CPU kernels of the rnn_forward, rnn_backward and rnn_cell ops, callable without the dispatcher.
std::tuple<at::Tensor, at::Tensor> rnn_forward(const at::Tensor& x, const at::Tensor& h0, const at::Tensor& w_ih,
                                               const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
                                               const std::optional<at::Tensor>& b_hh,
                                               const std::optional<at::Tensor>& batch_sizes,
                                               c10::string_view nonlinearity);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> rnn_backward(
    const std::optional<at::Tensor>& grad_out, const std::optional<at::Tensor>& grad_h_n, const at::Tensor& x,
    const at::Tensor& h0, const at::Tensor& w_ih, const at::Tensor& w_hh, const at::Tensor& out,
    const std::optional<at::Tensor>& batch_sizes, c10::string_view nonlinearity, bool need_grad_x);
at::Tensor rnn_cell(const at::Tensor& x, const at::Tensor& h, const at::Tensor& w_ih, const at::Tensor& w_hh,
                    const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh,
                    c10::string_view nonlinearity);

// The instruction sets ("baseline", "avx2", "avx512") this CPU and build support, worst to best:
// the choices of knob cpu_isa after "auto".
std::vector<std::string> cpu_isas();
// The one whose kernels run now (knob cpu_isa, with "auto" resolved).
std::string isa_in_use();
// How those kernels convert float16 / bfloat16 storage to float and back.
std::string conversions_in_use();

}  // namespace myrnn_fast::cpu
