// The cpp backend's eager route (myrnn_fast/backends/_cpp.py says which calls take it): a whole
// RNN (every layer and direction) or one RNNCell step in one call from Python, with its autograd
// node recorded here, in C++. A Python autograd.Function costs some 70 us per training step of
// its own (its apply, the engine's call back into Python, the backward's unpacking), more than a
// short sequence's whole work; a C++ node costs a few. Everything that records or transforms a
// program takes the registered ops instead (myrnn_fast/ops.py).
#pragma once

#include "ops/rnn_stack.h"

#include <ATen/core/Tensor.h>

#include <functional>
#include <optional>
#include <string>
#include <vector>

namespace myrnn_fast::eager {

// What a backward with create_graph=True hands to the differentiable fallback (set_graph_backward):
// the call's inputs as autograd saw them, the upstream gradients and which inputs need theirs.
struct GraphBackwardCall {
  std::string kind;                          // "stack" or "cell"
  std::vector<at::Tensor> inputs;            // stack: x, hx, weights...; cell: x, h, w_ih, w_hh, b_ih, b_hh
  std::vector<at::Tensor> grads;             // stack: grad_out, grad_h_n; cell: grad_h'; undefined: none
  std::vector<bool> needed;                  // per input
  std::optional<at::Tensor> batch_sizes, reverse_index;  // stack only
  int64_t num_layers;
  bool bidirectional, bias;
  std::string nonlinearity;
};

// A backward recorded for double backward cannot run the kernels: their gradients would have no
// graph. It calls this instead (installed from Python, where the torch backend's differentiable
// formulas live), which returns one gradient per input (undefined where none is needed).
using GraphBackward = std::function<std::vector<at::Tensor>(const GraphBackwardCall&)>;
void set_graph_backward(GraphBackward fn);

// {out, h_n} of the whole stack (stack::stack_forward's arguments), recording one autograd node
// when grad mode is on and an input requires grad.
std::vector<at::Tensor> stack(const at::Tensor& x, const at::Tensor& hx, const std::vector<at::Tensor>& weights,
                              const std::optional<at::Tensor>& batch_sizes,
                              const std::optional<at::Tensor>& reverse_index, const stack::Spec& spec);

// A torch.nn.RNN module's attributes, as module_forward reads them.
struct ModuleArgs {
  int64_t input_size, hidden_size;
  bool batch_first;
  stack::Spec spec;
};

// A whole module call, RNN.forward(input, hx) with a plain tensor on the CPU, in C++: the
// module's reshaping (unbatched input, batch_first, zeros for an absent hx) around `stack`.
// Returns {out, h_n}, or nullopt wherever the call is not the common case or would fail torch.nn's
// checks: the module then takes its Python path, which has every case and raises every error in
// torch.nn's words, so none is repeated here.
std::optional<std::tuple<at::Tensor, at::Tensor>> module_forward(const at::Tensor& input,
                                                                 const std::optional<at::Tensor>& hx,
                                                                 const std::vector<at::Tensor>& weights,
                                                                 const ModuleArgs& m);

// One RNNCell step h' (the rnn_cell op's arguments), recording its node as `stack` does.
at::Tensor cell(const at::Tensor& x, const at::Tensor& h, const at::Tensor& w_ih, const at::Tensor& w_hh,
                const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh,
                c10::string_view nonlinearity);

// A whole RNNCell module call, RNNCell.forward(input, hx) with plain CPU tensors, in C++: the
// module's reshaping (unbatched input, zeros for an absent hx) around `cell`. Returns h', or
// nullopt wherever module_forward would (the module's Python path then runs and raises).
std::optional<at::Tensor> cell_module_forward(const at::Tensor& input, const std::optional<at::Tensor>& hx,
                                              const at::Tensor& w_ih, const at::Tensor& w_hh,
                                              const std::optional<at::Tensor>& b_ih,
                                              const std::optional<at::Tensor>& b_hh, c10::string_view nonlinearity,
                                              int64_t input_size, int64_t hidden_size);

// For benchmarks: a node with a layer's inputs (x [T, B, I] and its weights) and outputs
// ({out [T, B, hidden], h_n [1, B, hidden]}, uninitialized) that does no work, forward or backward.
std::vector<at::Tensor> no_work(const at::Tensor& x, const std::vector<at::Tensor>& weights, int64_t hidden);

}  // namespace myrnn_fast::eager
