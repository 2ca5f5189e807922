// A whole RNN in one call (see rnn_stack.h): the module layer's loop over layers and directions,
// each layer the device's rnn_forward / rnn_backward kernel called directly. Where a time step
// happens is unchanged: inside those kernels (rnn_cpu.cpp, rnn_cuda.cpp).

#include "ops/rnn_stack.h"

#include "ops/rnn_cpu.h"
#ifdef MYRNN_WITH_CUDA
#include "ops/rnn_cuda.h"
#endif

#include <ATen/ATen.h>

namespace myrnn_fast::stack {
namespace {

void check_spec(const at::Tensor& hx, const std::vector<at::Tensor>& weights, const Spec& spec) {
  TORCH_CHECK_VALUE(spec.num_layers >= 1, "myrnn_fast: num_layers must be at least 1, got ", spec.num_layers);
  const int64_t layers_directions = spec.num_layers * spec.directions();
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == layers_directions * spec.per_direction(), "myrnn_fast: ",
              spec.num_layers, " layers", spec.bidirectional ? " in both directions" : "", spec.bias ? " with" : " without",
              " biases take ", layers_directions * spec.per_direction(), " weights, got ", weights.size());
  TORCH_CHECK(hx.dim() == 3 && hx.size(0) == layers_directions, "myrnn_fast: hx must be [", layers_directions,
              ", batch, hidden], got ", hx.sizes());
}

// The reverse direction runs the forward recurrence over each sequence reversed in place.
at::Tensor reversed(const at::Tensor& t, const std::optional<at::Tensor>& index) {
  return index ? t.index_select(0, *index) : t.flip(0);
}

std::optional<at::Tensor> bias_at(const std::vector<at::Tensor>& weights, int64_t at, const Spec& spec) {
  return spec.bias ? std::optional<at::Tensor>(weights[at]) : std::nullopt;
}

at::Tensor stacked(const std::vector<at::Tensor>& states) {
  return states.size() == 1 ? states[0].unsqueeze(0) : at::stack(states);
}

}  // namespace

DeviceKernels kernels_for(const at::Tensor& x) {
#ifdef MYRNN_WITH_CUDA
  if (x.is_cuda()) return {&cuda::rnn_forward, &cuda::rnn_backward, &cuda::rnn_cell};
#endif
  TORCH_CHECK(x.is_cpu(), "myrnn_fast: no kernels for tensors on ", x.device());
  return {&cpu::rnn_forward, &cpu::rnn_backward, &cpu::rnn_cell};
}

std::vector<at::Tensor> stack_forward(const at::Tensor& x, const at::Tensor& hx, const std::vector<at::Tensor>& weights,
                                      const std::optional<at::Tensor>& batch_sizes,
                                      const std::optional<at::Tensor>& reverse_index, const Spec& spec, bool save) {
  check_spec(hx, weights, spec);
  TORCH_CHECK(!spec.bidirectional || !batch_sizes || reverse_index,
              "myrnn_fast: a bidirectional stack over packed input needs reverse_index");
  const DeviceKernels k = kernels_for(x);
  const int64_t D = spec.directions(), P = spec.per_direction();
  std::vector<at::Tensor> h_n(spec.num_layers * D), inputs, outs;
  at::Tensor input = x;
  for (int64_t layer = 0; layer < spec.num_layers; ++layer) {
    if (save && layer > 0) inputs.push_back(input);
    std::vector<at::Tensor> directions(D);
    for (int64_t d = 0; d < D; ++d) {
      const int64_t i = layer * D + d, w = i * P;
      const at::Tensor x_in = d ? reversed(input, reverse_index) : input;
      auto [out, h] = k.forward(x_in, hx.select(0, i), weights[w], weights[w + 1], bias_at(weights, w + 2, spec),
                                bias_at(weights, w + 3, spec), batch_sizes, spec.nonlinearity);
      directions[d] = d ? reversed(out, reverse_index) : out;
      if (save) outs.push_back(std::move(out));
      h_n[i] = std::move(h);
    }
    input = D == 1 ? directions[0] : at::cat(directions, -1);
  }
  std::vector<at::Tensor> result{input, stacked(h_n)};
  result.insert(result.end(), inputs.begin(), inputs.end());
  result.insert(result.end(), outs.begin(), outs.end());
  return result;
}

std::vector<at::Tensor> stack_backward(const std::optional<at::Tensor>& grad_out,
                                       const std::optional<at::Tensor>& grad_h_n, const at::Tensor& x,
                                       const at::Tensor& hx, const std::vector<at::Tensor>& weights,
                                       const std::vector<at::Tensor>& saved,
                                       const std::optional<at::Tensor>& batch_sizes,
                                       const std::optional<at::Tensor>& reverse_index, const Spec& spec,
                                       bool need_grad_x) {
  check_spec(hx, weights, spec);
  const DeviceKernels k = kernels_for(x);
  const int64_t L = spec.num_layers, D = spec.directions(), P = spec.per_direction(), H = hx.size(2);
  TORCH_CHECK(static_cast<int64_t>(saved.size()) == (L - 1) + L * D, "myrnn_fast: stack_backward takes the ",
              (L - 1) + L * D, " tensors stack_forward saved, got ", saved.size());
  const auto outs = saved.begin() + (L - 1);  // every layer and direction's own output
  std::vector<at::Tensor> grads(1 + 1 + weights.size()), grad_hx(L * D);
  // The gradient of the current layer's output [.., D * H]: the stack's grad_out at the top,
  // the layer above's grad_x below it.
  at::Tensor grad_above = grad_out && grad_out->defined() ? *grad_out : at::Tensor();
  for (int64_t layer = L - 1; layer >= 0; --layer) {
    const at::Tensor& input = layer == 0 ? x : saved[layer - 1];
    const bool need_x = layer > 0 || need_grad_x;
    at::Tensor grad_input;
    for (int64_t d = 0; d < D; ++d) {
      const int64_t i = layer * D + d, w = i * P;
      std::optional<at::Tensor> go;
      if (grad_above.defined()) {
        const at::Tensor g = D == 1 ? grad_above : grad_above.narrow(-1, d * H, H);
        go = d ? reversed(g, reverse_index) : g;
      }
      std::optional<at::Tensor> ghn;
      if (grad_h_n && grad_h_n->defined()) ghn = grad_h_n->select(0, i);
      const at::Tensor x_in = d ? reversed(input, reverse_index) : input;
      auto [gx, gh0, gw_ih, gw_hh, gb] = k.backward(go, ghn, x_in, hx.select(0, i), weights[w], weights[w + 1],
                                                    outs[i], batch_sizes, spec.nonlinearity, need_x);
      if (need_x) {
        if (d) gx = reversed(gx, reverse_index);
        grad_input = grad_input.defined() ? grad_input.add_(gx) : gx;
      }
      grad_hx[i] = std::move(gh0);
      grads[2 + w] = std::move(gw_ih);
      grads[2 + w + 1] = std::move(gw_hh);
      if (spec.bias) grads[2 + w + 2] = grads[2 + w + 3] = gb;  // b_ih and b_hh meet the same sum
    }
    grad_above = grad_input;
  }
  grads[0] = need_grad_x ? grad_above : at::empty({0}, x.options());
  grads[1] = stacked(grad_hx);
  return grads;
}

}  // namespace myrnn_fast::stack
