// The device-agnostic parts of a layer, shared by the CPU and CUDA ops: the input projection, the
// recurrence as one GEMM per step (path "gemm": where a time step happens when the fused kernels
// of kernels/ do not run), and everything the backward does after the reverse recurrence. Only
// ATen calls here, so each runs on the tensors' device (MKL/OpenBLAS or cuBLAS, on the current
// stream); the caller passes its own elementwise kernels.
#pragma once

#include "ops/rnn_checks.h"

#include <ATen/ATen.h>

#include <optional>
#include <tuple>
#include <vector>

namespace myrnn_fast {

// The CUDA ops run float16 / bfloat16 in float32 (as torch's GEMMs accumulate them) and round
// once at the end: their device kernels are written for float and double. (The CPU kernels read
// and write 16-bit storage themselves.)
inline bool is_reduced(const at::Tensor& x) {
  return x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16;
}

// An op's arguments as in_float32 passes them on: floating tensors in float32, the rest as they are.
inline at::Tensor widen(const at::Tensor& t) {
  return t.defined() && t.is_floating_point() ? t.to(at::kFloat) : t;
}
inline std::optional<at::Tensor> widen(const std::optional<at::Tensor>& t) {
  if (t) return widen(*t);
  return t;
}
template <typename T>
const T& widen(const T& value) {
  return value;
}

inline at::Tensor round_to(const at::Tensor& t, at::ScalarType dtype) { return t.to(dtype); }
template <typename... Tensors>
std::tuple<Tensors...> round_to(const std::tuple<Tensors...>& results, at::ScalarType dtype) {
  return std::apply([&](const auto&... t) { return std::tuple<Tensors...>(t.to(dtype)...); }, results);
}

// op(args...) computed in float32, its tensor results rounded to `dtype`: how the CPU and CUDA ops
// run float16 / bfloat16.
template <typename Op, typename... Args>
auto in_float32(const Op& op, at::ScalarType dtype, const Args&... args) {
  return round_to(op(widen(args)...), dtype);
}

// A host vector of indices as an int64 tensor on `device`. To a GPU it goes from pinned memory
// without blocking: the op must not synchronize the host with the stream.
inline at::Tensor index_tensor(const std::vector<int64_t>& values, const at::Device& device) {
  const auto n = static_cast<int64_t>(values.size());
  if (device.is_cpu()) return at::tensor(values, at::kLong);
  at::Tensor host = at::empty({n}, at::TensorOptions(at::kLong).pinned_memory(true));
  std::copy(values.begin(), values.end(), host.data_ptr<int64_t>());
  return host.to(device, /*non_blocking=*/true);
}

// b_ih + b_hh, added once for all rows (null without biases).
inline std::optional<at::Tensor> summed_bias(const std::optional<at::Tensor>& b_ih,
                                             const std::optional<at::Tensor>& b_hh) {
  return b_ih ? std::optional<at::Tensor>(*b_ih + *b_hh) : std::nullopt;
}

// rows [N, I] W_ih^T + bias for every row (every step) in one GEMM, into a new contiguous [N, H]
// tensor that the recurrence then updates in place. It is the GEMM torch.nn runs, so overflowing
// products become the same Inf and NaN as there.
inline at::Tensor input_projection(const at::Tensor& rows, const at::Tensor& w_ih, const std::optional<at::Tensor>& bias) {
  return (bias ? at::addmm(*bias, rows, w_ih.t()) : at::mm(rows, w_ih.t())).contiguous();
}

// One RNNCell step before its nonlinearity, x W_ih^T + h W_hh^T + b_ih + b_hh, as two GEMMs.
inline at::Tensor cell_preactivation(const at::Tensor& x, const at::Tensor& h, const at::Tensor& w_ih,
                                     const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
                                     const std::optional<at::Tensor>& b_hh) {
  at::Tensor z = input_projection(x, w_ih, summed_bias(b_ih, b_hh));
  z.addmm_(h, w_hh.t());
  return z;
}

// Path "gemm" of the forward recurrence, on either device: out [N, H] holds the input projections;
// step by step, out_t += out_{t-1} W_hh^T (h0 at t = 0), then activate(out_t) in place. h_n
// receives each row's last state. Row r of a step continues row r of the step before, so the
// previous state of a step's rows is a prefix of the previous step's.
template <typename Activate>
void gemm_forward(const at::Tensor& out, const at::Tensor& h0, const at::Tensor& w_hh, const at::Tensor& h_n,
                  const Layout& l, const Activate& activate) {
  const at::Tensor w_t = w_hh.t();
  at::Tensor prev = h0;
  for (int64_t t = 0; t < l.seq_len; ++t) {
    const Step step = l.step(t);
    at::Tensor cur = out.narrow(0, step.offset, step.batch_size);
    cur.addmm_(prev.narrow(0, 0, step.batch_size), w_t);
    activate(cur);
    // Rows whose sequence ends at this step: their state is final.
    const int64_t next = step.next_batch_size, ended = step.batch_size - next;
    if (ended > 0) h_n.narrow(0, next, ended).copy_(cur.narrow(0, next, ended));
    prev = cur;
  }
}

// Path "gemm" of the reverse recurrence into dz [N, H] (the gradient at the pre-activations):
// dz_t = (grad_out_t + dz_{t+1} W_hh) * act'(y_t), with grad_h_n instead of dz_{t+1} for rows that
// end at t. go / ghn may be undefined (zeros). mul_dact(g, y) does g *= act'(y) in place.
// grad_out is copied into dz once, so each step is one in-place GEMM and one elementwise call.
template <typename MulDact>
void gemm_backward(const at::Tensor& dz, const at::Tensor& go, const at::Tensor& ghn, const at::Tensor& y,
                   const at::Tensor& w_hh, const Layout& l, const MulDact& mul_dact) {
  if (go.defined())
    dz.copy_(go);
  else
    dz.zero_();
  at::Tensor dz_next;  // dz of step t + 1
  for (int64_t t = l.seq_len - 1; t >= 0; --t) {
    const Step step = l.step(t);
    const int64_t carried = step.next_batch_size, ended = step.batch_size - carried;
    const at::Tensor dz_t = dz.narrow(0, step.offset, step.batch_size);
    if (carried > 0) dz_t.narrow(0, 0, carried).addmm_(dz_next, w_hh);
    if (ended > 0 && ghn.defined()) dz_t.narrow(0, carried, ended).add_(ghn.narrow(0, carried, ended));
    mul_dact(dz_t, y.narrow(0, step.offset, step.batch_size));
    dz_next = dz_t;
  }
}

// For every row of steps 1 .. seq_len-1 of y [N, H], in order, the row of the step before that it
// continues: what those rows' dz meets in grad_w_hh. Dense, that is simply y's first N - B rows.
inline at::Tensor previous_rows(const at::Tensor& y, const Layout& l) {
  if (!l.packed) return y.narrow(0, 0, l.rows - l.batch);
  std::vector<int64_t> source;
  source.reserve(l.rows - l.batch);
  for (int64_t t = 1; t < l.seq_len; ++t) {
    const Step before = l.step(t - 1);
    for (int64_t r = 0; r < before.next_batch_size; ++r) source.push_back(before.offset + r);
  }
  return y.index_select(0, index_tensor(source, y.device()));
}

// rnn_backward's results from dz [N, H], each one GEMM or reduction over all steps at once:
// (grad_x, grad_h0, grad_w_ih, grad_w_hh, grad_b). y [N, H] is the forward's output, ghn the
// (possibly undefined) gradient of h_n, which is all there is to grad_h0 when T = 0.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_grads(
    const at::Tensor& dz, const at::Tensor& x, const at::Tensor& h0, const at::Tensor& y, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const at::Tensor& ghn, const Layout& l, bool need_grad_x) {
  const int64_t B = l.batch, H = l.hidden, N = l.rows;
  const at::Tensor rows = x.reshape({N, l.input});
  at::Tensor grad_x = need_grad_x ? at::mm(dz, w_ih).view(x.sizes()) : at::empty({0}, x.options());
  at::Tensor grad_w_ih = at::mm(dz.t(), rows);
  at::Tensor grad_b = dz.sum(0);
  if (l.seq_len == 0)  // h_n is h0 itself
    return {grad_x, ghn.defined() ? ghn.clone() : at::zeros({B, H}, y.options()), grad_w_ih,
            at::zeros({H, H}, y.options()), grad_b};
  // Every row is active at step 0, so dz's first B rows meet h0; the later ones meet the rows
  // they continue.
  const at::Tensor dz0 = dz.narrow(0, 0, B), dz_rest = dz.narrow(0, B, N - B);
  at::Tensor grad_h0 = at::mm(dz0, w_hh);
  at::Tensor grad_w_hh = at::addmm(at::mm(dz0.t(), h0), dz_rest.t(), previous_rows(y, l));
  return {grad_x, grad_h0, grad_w_ih, grad_w_hh, grad_b};
}

}  // namespace myrnn_fast
