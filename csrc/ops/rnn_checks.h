// Argument checks shared by the CPU and CUDA implementations of the myrnn_fast ops. Every op
// validates here before any kernel sees a pointer: a bad call is a Python exception (RuntimeError,
// or TypeError / ValueError where torch would use those), never a crash.
#pragma once

#include "kernels/sequence.h"

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <string_view>
#include <utility>
#include <vector>

namespace myrnn_fast {

inline bool is_relu(std::string_view nonlinearity) {
  TORCH_CHECK_VALUE(nonlinearity == "tanh" || nonlinearity == "relu", "Unknown nonlinearity '",
                    nonlinearity, "'. Select from 'tanh' or 'relu'.");
  return nonlinearity == "relu";
}

// The checked shape of one op call: seq_len steps over `rows` packed rows of `batch` at most, with
// `input` and `hidden` features. Packed input keeps each step's row count and first row in host
// vectors; dense input leaves them empty, as Sequence does. An RNNCell call is one dense step.
struct Layout {
  int64_t seq_len = 0, batch = 0, rows = 0, input = 0, hidden = 0;
  bool packed = false;
  std::vector<int64_t> batch_sizes, offsets;  // [seq_len] each when packed, else empty

  // The kernels' view of this layout (pointing into its vectors, so valid while it lives).
  Sequence sequence() const {
    return {seq_len, batch, hidden, packed ? batch_sizes.data() : nullptr, packed ? offsets.data() : nullptr};
  }
  Step step(int64_t t) const { return step_at(sequence(), t); }
};

inline void check_same(const at::Tensor& t, const at::Tensor& like, const char* name) {
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), "myrnn_fast: ", name, " has dtype ",
              t.scalar_type(), " but the input has dtype ", like.scalar_type());
  TORCH_CHECK(t.device() == like.device(), "myrnn_fast: ", name, " is on device ", t.device(),
              " but the input is on device ", like.device());
}

inline void check_shape(const at::Tensor& t, at::IntArrayRef expected, const char* name) {
  TORCH_CHECK(t.sizes() == expected, "myrnn_fast: ", name, " must have shape ", expected, ", got ",
              t.sizes());
}

// Everything about a layer call but the sequence: weights, biases and h0 against the input.
inline Layout weights_shape(const at::Tensor& x, const at::Tensor& h0, const at::Tensor& w_ih, const at::Tensor& w_hh,
                            const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh) {
  Layout l;
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "myrnn_fast: input must be floating point, got ",
              x.scalar_type());
  for (auto [t, name] : {std::pair{&h0, "h0"}, {&w_ih, "w_ih"}, {&w_hh, "w_hh"}}) check_same(*t, x, name);
  TORCH_CHECK(w_hh.dim() == 2 && w_hh.size(0) == w_hh.size(1), "myrnn_fast: w_hh must be square [H, H], got ",
              w_hh.sizes());
  l.hidden = w_hh.size(0);
  TORCH_CHECK(w_ih.dim() == 2 && w_ih.size(0) == l.hidden, "myrnn_fast: w_ih must have shape [", l.hidden,
              ", input_size], got ", w_ih.sizes());
  l.input = w_ih.size(1);
  TORCH_CHECK(b_ih.has_value() == b_hh.has_value(), "myrnn_fast: b_ih and b_hh must be given together");
  for (auto [b, name] : {std::pair{&b_ih, "b_ih"}, {&b_hh, "b_hh"}}) {
    if (!b->has_value()) continue;
    check_same(**b, x, name);
    check_shape(**b, {l.hidden}, name);
  }
  TORCH_CHECK(h0.dim() == 2 && h0.size(1) == l.hidden, "myrnn_fast: h0 must have shape [batch, ", l.hidden,
              "], got ", h0.sizes());
  l.batch = h0.size(0);
  return l;
}

inline Layout cell_shape(const at::Tensor& x, const at::Tensor& h, const at::Tensor& w_ih, const at::Tensor& w_hh,
                         const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh) {
  Layout l = weights_shape(x, h, w_ih, w_hh, b_ih, b_hh);
  TORCH_CHECK(x.dim() == 2, "myrnn_fast: rnn_cell input must be [batch, input_size], got ", x.sizes());
  check_shape(x, {l.batch, l.input}, "input");
  l.seq_len = 1;
  l.rows = l.batch;
  return l;
}

// Checks the layer arguments against each other and returns their layout.
inline Layout layer_layout(const at::Tensor& x, const at::Tensor& h0, const at::Tensor& w_ih,
                           const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
                           const std::optional<at::Tensor>& b_hh,
                           const std::optional<at::Tensor>& batch_sizes) {
  Layout l = weights_shape(x, h0, w_ih, w_hh, b_ih, b_hh);
  l.packed = batch_sizes.has_value();
  if (!l.packed) {
    TORCH_CHECK(x.dim() == 3, "myrnn_fast: input must be [T, B, input_size] (or packed rows with batch_sizes), got ",
                x.sizes());
    check_shape(x, {x.size(0), l.batch, l.input}, "input");
    l.seq_len = x.size(0);
    l.rows = l.seq_len * l.batch;
    return l;
  }
  const at::Tensor& sizes = *batch_sizes;
  TORCH_CHECK_TYPE(sizes.scalar_type() == at::kLong, "myrnn_fast: batch_sizes must be int64, got ",
                   sizes.scalar_type());
  TORCH_CHECK(sizes.device().is_cpu() && sizes.dim() == 1,
              "myrnn_fast: batch_sizes must be a 1-D tensor on the CPU, as in a PackedSequence");
  TORCH_CHECK(x.dim() == 2, "myrnn_fast: packed input must be [rows, input_size], got ", x.sizes());
  check_shape(x, {x.size(0), l.input}, "packed input");
  const at::Tensor c = sizes.contiguous();
  const int64_t* p = c.const_data_ptr<int64_t>();
  l.seq_len = c.numel();
  l.batch_sizes.assign(p, p + l.seq_len);
  l.offsets.resize(l.seq_len);
  int64_t previous = l.batch;
  for (int64_t t = 0; t < l.seq_len; ++t) {
    const int64_t b = l.batch_sizes[t];
    TORCH_CHECK(b >= 0 && b <= previous, "myrnn_fast: batch_sizes must be non-negative, non-increasing and at ",
                "most h0's batch (", l.batch, "); step ", t, " has ", b, " after ", previous);
    previous = b;
    l.offsets[t] = l.rows;
    l.rows += b;
  }
  TORCH_CHECK(l.seq_len == 0 || l.batch_sizes[0] == l.batch, "myrnn_fast: the first step has ",
              l.seq_len ? l.batch_sizes[0] : 0, " rows but h0 has ", l.batch);
  TORCH_CHECK(l.rows == x.size(0), "myrnn_fast: batch_sizes add up to ", l.rows, " rows but the packed input has ",
              x.size(0));
  return l;
}

// The output layout of a layer: the input's leading dimensions with the hidden size last.
inline std::vector<int64_t> output_sizes(const at::Tensor& x, int64_t hidden) {
  std::vector<int64_t> sizes(x.sizes().begin(), x.sizes().end());
  sizes.back() = hidden;
  return sizes;
}

// rnn_backward's saved output and incoming gradients, checked against the layer. The gradients
// come back contiguous as [rows, H] and [B, H]; undefined ones (autograd's zeros) stay undefined.
inline std::pair<at::Tensor, at::Tensor> incoming_grads(const std::optional<at::Tensor>& grad_out,
                                                        const std::optional<at::Tensor>& grad_h_n,
                                                        const at::Tensor& x, const at::Tensor& out, const Layout& l) {
  const auto out_sizes = output_sizes(x, l.hidden);
  check_same(out, x, "out");
  check_shape(out, out_sizes, "out");
  at::Tensor go, ghn;
  if (grad_out && grad_out->defined()) {
    check_same(*grad_out, x, "grad_out");
    check_shape(*grad_out, out_sizes, "grad_out");
    go = grad_out->reshape({l.rows, l.hidden}).contiguous();
  }
  if (grad_h_n && grad_h_n->defined()) {
    check_same(*grad_h_n, x, "grad_h_n");
    check_shape(*grad_h_n, {l.batch, l.hidden}, "grad_h_n");
    ghn = grad_h_n->contiguous();
  }
  return {go, ghn};
}

}  // namespace myrnn_fast
