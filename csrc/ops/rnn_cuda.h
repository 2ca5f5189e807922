// What myrnn_fast._C exposes of the CUDA implementation besides the ops (which are reached
// through torch.ops): dispatcher-free entries for eager calls.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace myrnn_fast::cuda {

// The CUDA kernels of the rnn_forward, rnn_backward and rnn_cell ops, callable without the dispatcher.
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

}  // namespace myrnn_fast::cuda
