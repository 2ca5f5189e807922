// A whole RNN (every layer, both directions) in one call: what the module layer's loop over
// layers and directions does (myrnn_fast/modules.py, stacked_layers), for an eager call whose
// Python cost per layer and direction would exceed a small layer's work. No dispatcher and no
// autograd here: ops/eager.cpp's autograd node wraps stack_forward and stack_backward, and
// everything that traces (torch.compile, torch.export, TorchScript) records the per-layer ops
// instead.
#pragma once

#include "ops/rnn_cpu.h"

#include <ATen/core/Tensor.h>

#include <optional>
#include <string_view>
#include <vector>

namespace myrnn_fast::stack {

// How the flat weight list is laid out: torch.nn.RNN's order, per layer then direction,
// (w_ih, w_hh) or (w_ih, w_hh, b_ih, b_hh).
struct Spec {
  int64_t num_layers;
  bool bidirectional;
  bool bias;
  std::string_view nonlinearity;
  int64_t directions() const { return bidirectional ? 2 : 1; }
  int64_t per_direction() const { return bias ? 4 : 2; }
};

// The kernels for the tensors' device (ops/rnn_cpu.h, ops/rnn_cuda.h); a device with none is
// an error.
struct DeviceKernels {
  decltype(&cpu::rnn_forward) forward;
  decltype(&cpu::rnn_backward) backward;
  decltype(&cpu::rnn_cell) cell;
};
DeviceKernels kernels_for(const at::Tensor& x);

// The stack's forward over x [T, B, I] (or packed rows [N, I] with batch_sizes, and then
// reverse_index, the permutation that reverses each sequence in place, for a bidirectional stack).
//   hx       [layers * directions, B, H]
//   weights  the flat list, as Spec says
//   save     also return what stack_backward needs
// Returns {out, h_n} then, with save, every layer's input from the second on and every layer and
// direction's own output (the reverse direction's in its own, reversed, step order).
std::vector<at::Tensor> stack_forward(const at::Tensor& x, const at::Tensor& hx, const std::vector<at::Tensor>& weights,
                                      const std::optional<at::Tensor>& batch_sizes,
                                      const std::optional<at::Tensor>& reverse_index, const Spec& spec, bool save);

// The gradients of a stack_forward(..., save=true): {grad_x (empty unless need_grad_x), grad_hx,
// then one per weight in the flat list's order}. grad_out / grad_h_n may be undefined (zeros).
// `saved` is what stack_forward returned after out and h_n.
std::vector<at::Tensor> stack_backward(const std::optional<at::Tensor>& grad_out,
                                       const std::optional<at::Tensor>& grad_h_n, const at::Tensor& x,
                                       const at::Tensor& hx, const std::vector<at::Tensor>& weights,
                                       const std::vector<at::Tensor>& saved,
                                       const std::optional<at::Tensor>& batch_sizes,
                                       const std::optional<at::Tensor>& reverse_index, const Spec& spec,
                                       bool need_grad_x);

}  // namespace myrnn_fast::stack
