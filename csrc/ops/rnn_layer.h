// The device-agnostic parts of a layer, shared by the CPU and CUDA ops: the recurrence as one
// GEMM per step (for hidden sizes the fused kernels do not cover) and everything the backward
// does after the reverse recurrence. Only ATen calls here, so each runs on the tensors' device
// (MKL/OpenBLAS or cuBLAS, on the current stream); the caller passes its own elementwise kernels.
#pragma once

#include "ops/rnn_checks.h"

#include <ATen/ATen.h>

#include <optional>
#include <tuple>
#include <vector>

namespace myrnn_fast {

// float16 / bfloat16 run in float32 (as torch's GEMMs accumulate them) and round once at the
// end; the kernels are written for float and double.
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

// out [N, H] holds the input projections; step by step, out_t += out_{t-1} W_hh^T (h0 at t = 0),
// then activate(out_t) in place. h_n receives each row's last state.
template <typename Activate>
void gemm_forward(const at::Tensor& out, const at::Tensor& h0, const at::Tensor& w_hh, const at::Tensor& h_n,
                  const Layout& l, const Activate& activate) {
  const at::Tensor w_t = w_hh.t();
  for (int64_t t = 0; t < l.steps; ++t) {
    const int64_t active = l.batch_sizes[t];
    at::Tensor cur = out.narrow(0, l.offsets[t], active);
    const at::Tensor prev = t == 0 ? h0.narrow(0, 0, active) : out.narrow(0, l.offsets[t - 1], active);
    cur.addmm_(prev, w_t);
    activate(cur);
    // Rows whose sequence ends at this step: their state is final.
    const int64_t next = t + 1 < l.steps ? l.batch_sizes[t + 1] : 0;
    if (active > next) h_n.narrow(0, next, active - next).copy_(cur.narrow(0, next, active - next));
  }
}

// The reverse recurrence into dz [N, H] (the gradient at the pre-activations), step by step:
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
  for (int64_t t = l.steps - 1; t >= 0; --t) {
    const int64_t active = l.batch_sizes[t];
    const int64_t carried = t + 1 < l.steps ? l.batch_sizes[t + 1] : 0;
    const at::Tensor dz_t = dz.narrow(0, l.offsets[t], active);
    if (carried > 0) dz_t.narrow(0, 0, carried).addmm_(dz.narrow(0, l.offsets[t + 1], carried), w_hh);
    if (active > carried && ghn.defined())
      dz_t.narrow(0, carried, active - carried).add_(ghn.narrow(0, carried, active - carried));
    mul_dact(dz_t, y.narrow(0, l.offsets[t], active));
  }
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
  if (l.steps == 0)  // h_n is h0 itself
    return {grad_x, ghn.defined() ? ghn.clone() : at::zeros({B, H}, y.options()), grad_w_ih,
            at::zeros({H, H}, y.options()), grad_b};
  // Every row is active at step 0, so dz's first B rows meet h0; later rows meet the previous
  // step's output of the same batch row, which for packed input is a prefix of that step.
  const at::Tensor dz0 = dz.narrow(0, 0, B), dz_rest = dz.narrow(0, B, N - B);
  at::Tensor prev;
  if (!l.packed) {
    prev = y.narrow(0, 0, N - B);
  } else {
    std::vector<int64_t> source(N - B);
    for (int64_t t = 1; t < l.steps; ++t)
      for (int64_t i = 0; i < l.batch_sizes[t]; ++i) source[l.offsets[t] - B + i] = l.offsets[t - 1] + i;
    prev = y.index_select(0, index_tensor(source, y.device()));
  }
  at::Tensor grad_h0 = at::mm(dz0, w_hh);
  at::Tensor grad_w_hh = at::addmm(at::mm(dz0.t(), h0), dz_rest.t(), prev);
  return {grad_x, grad_h0, grad_w_ih, grad_w_hh, grad_b};
}

}  // namespace myrnn_fast
