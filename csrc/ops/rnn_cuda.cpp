// CUDA implementations of the myrnn_fast ops: rnn_forward, rnn_backward, rnn_cell.
//
// The input projection of every step is one cuBLAS GEMM, and so are the weight gradients after
// the reverse recurrence (ops/rnn_layer.h, shared with the CPU). The recurrence takes one of two
// kinds of path (knob cuda_path; choose_plan):
//  - "registers" / "shared": the persistent kernels of kernels/cuda/, one launch for the whole
//    sequence, W_hh in each thread's registers (a column each, H <= 128 in float32) or else in each
//    block's shared memory, used when it fits and the batch runs in one wave;
//  - "gemm": one cuBLAS GEMM per step, then a fused elementwise kernel (ops/rnn_layer.h).
// Everything runs on the current stream of the input's device, with no host synchronization:
// packed layouts reach the GPU through pinned memory without blocking.

#include "ops/rnn_cuda.h"

#include "kernels/cuda/rnn_cuda_kernels.h"
#include "ops/knobs.h"
#include "ops/rnn_checks.h"
#include "ops/rnn_layer.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <vector>

namespace myrnn_fast::cuda {

namespace {

using knobs::CudaPath;

// A Plan that runs the persistent kernels (W_hh in registers where a column fits them, else in
// shared memory), or none for the per-step GEMM path.
template <typename T>
Plan choose_plan(const Layout& l, bool backward) {
  const CudaPath path = knobs::cuda_path.as<CudaPath>();
  if (path == CudaPath::kGemm) return {};
  const int registers = path == CudaPath::kShared ? 0 : register_columns<T>(l.hidden);
  const auto dtype = c10::toString(c10::CppTypeToScalarType<T>::value);
  TORCH_CHECK(path != CudaPath::kRegisters || registers > 0, "myrnn_fast: hidden size ", l.hidden, " in ", dtype,
              " is too large to keep W_hh in registers (up to 128 in float32, 64 in float64)");
  // Forced, the persistent kernels also take a batch that needs more than one wave of blocks.
  const bool forced = path != CudaPath::kAuto;
  const int rows_per_block = static_cast<int>(knobs::cuda_rows_per_block.get());
  const Plan plan = persistent_plan<T>(l.batch, l.hidden, backward, rows_per_block, forced, registers);
  TORCH_CHECK(plan.fits || !forced, "myrnn_fast: hidden size ", l.hidden, " in ", dtype,
              " does not fit one block's shared memory on this device, so the persistent CUDA kernels cannot run "
              "it (_C.set_knob('cuda_path', 'auto') chooses for you)");
  return plan;
}

// A packed layout reaches the GPU through pinned host memory that is reused once the copy is
// done: a CUDA graph would replay the copy from memory that holds something else by then.
void refuse_packed_capture(const Layout& l) {
  TORCH_CHECK(!l.packed || c10::cuda::currentStreamCaptureStatusMayInitCtx() == c10::cuda::CaptureStatus::None,
              "myrnn_fast: packed sequences cannot be captured in a CUDA graph (their step table is copied from "
              "host memory on every call); pad the batch instead");
}

// The kernels' view of a layout, its packed arrays copied to `device`; `keep` holds that copy.
Sequence on_device(const Layout& l, at::Tensor& keep, const at::Device& device) {
  Sequence s = l.sequence();
  if (l.packed) {
    std::vector<int64_t> arrays(l.batch_sizes);
    arrays.insert(arrays.end(), l.offsets.begin(), l.offsets.end());
    keep = index_tensor(arrays, device);
    s.batch_sizes = keep.const_data_ptr<int64_t>();
    s.offsets = s.batch_sizes + l.seq_len;
  }
  return s;
}

void check_cuda(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.is_cuda(), "myrnn_fast: ", op, "'s CUDA kernel got a tensor on ", x.device());
}

}  // namespace

// ---- forward --------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> rnn_forward(const at::Tensor& x, const at::Tensor& h0, const at::Tensor& w_ih,
                                               const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
                                               const std::optional<at::Tensor>& b_hh,
                                               const std::optional<at::Tensor>& batch_sizes,
                                               c10::string_view nonlinearity) {
  const bool relu = is_relu(nonlinearity);
  const Layout l = layer_layout(x, h0, w_ih, w_hh, b_ih, b_hh, batch_sizes);
  check_cuda(x, "rnn_forward");
  const c10::cuda::CUDAGuard guard(x.device());
  refuse_packed_capture(l);
  if (is_reduced(x))
    return in_float32(rnn_forward, x.scalar_type(), x, h0, w_ih, w_hh, b_ih, b_hh, batch_sizes, nonlinearity);
  const int64_t H = l.hidden;
  const at::Tensor rows = x.reshape({l.rows, l.input});
  const at::Tensor out = input_projection(rows, w_ih, summed_bias(b_ih, b_hh));
  const at::Tensor h = h0.contiguous();
  const at::Tensor h_n = at::empty_like(h);
  if (l.seq_len == 0) h_n.copy_(h);
  if (l.seq_len > 0 && l.batch > 0 && H > 0) {
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "myrnn_fast::rnn_forward_cuda", [&] {
      const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
      const Plan plan = choose_plan<scalar_t>(l, /*backward=*/false);
      if (plan.fits) {
        const at::Tensor w_hh_t = w_hh.t().contiguous();
        at::Tensor keep;
        const Sequence s = on_device(l, keep, x.device());
        C10_CUDA_CHECK(persistent_forward<scalar_t>(plan, s, out.data_ptr<scalar_t>(), h.const_data_ptr<scalar_t>(),
                                                    w_hh_t.const_data_ptr<scalar_t>(), h_n.data_ptr<scalar_t>(), relu,
                                                    stream));
        return;
      }
      gemm_forward(out, h, w_hh, h_n, l, [&](const at::Tensor& cur) {
        C10_CUDA_CHECK(activate<scalar_t>(cur.data_ptr<scalar_t>(), cur.numel(), relu, stream));
      });
    });
  }
  return {out.view(output_sizes(x, H)), h_n};
}

// ---- backward -------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> rnn_backward(
    const std::optional<at::Tensor>& grad_out, const std::optional<at::Tensor>& grad_h_n, const at::Tensor& x,
    const at::Tensor& h0, const at::Tensor& w_ih, const at::Tensor& w_hh, const at::Tensor& out,
    const std::optional<at::Tensor>& batch_sizes, c10::string_view nonlinearity, bool need_grad_x) {
  const bool relu = is_relu(nonlinearity);
  const Layout l = layer_layout(x, h0, w_ih, w_hh, std::nullopt, std::nullopt, batch_sizes);
  check_cuda(x, "rnn_backward");
  const c10::cuda::CUDAGuard guard(x.device());
  refuse_packed_capture(l);
  const auto [go, ghn] = incoming_grads(grad_out, grad_h_n, x, out, l);
  if (is_reduced(x))
    return in_float32(rnn_backward, x.scalar_type(), grad_out, grad_h_n, x, h0, w_ih, w_hh, out, batch_sizes,
                      nonlinearity, need_grad_x);
  const int64_t H = l.hidden, N = l.rows;
  const at::Tensor y = out.reshape({N, H}).contiguous();
  const at::Tensor w = w_hh.contiguous();
  const at::Tensor dz = at::empty({N, H}, y.options());
  if (N > 0 && H > 0) {
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "myrnn_fast::rnn_backward_cuda", [&] {
      const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
      const Plan plan = choose_plan<scalar_t>(l, /*backward=*/true);
      if (plan.fits) {
        at::Tensor keep;
        const Sequence s = on_device(l, keep, x.device());
        C10_CUDA_CHECK(persistent_backward<scalar_t>(
            plan, s, dz.data_ptr<scalar_t>(), go.defined() ? go.const_data_ptr<scalar_t>() : nullptr,
            ghn.defined() ? ghn.const_data_ptr<scalar_t>() : nullptr, y.const_data_ptr<scalar_t>(),
            w.const_data_ptr<scalar_t>(), relu, stream));
        return;
      }
      gemm_backward(dz, go, ghn, y, w, l, [&](const at::Tensor& g_t, const at::Tensor& y_t) {
        C10_CUDA_CHECK(mul_dact<scalar_t>(g_t.data_ptr<scalar_t>(), y_t.const_data_ptr<scalar_t>(), g_t.numel(), relu,
                                          stream));
      });
    });
  }
  return layer_grads(dz, x, h0, y, w_ih, w, ghn, l, need_grad_x);
}

// ---- one RNNCell step -----------------------------------------------------------------------

at::Tensor rnn_cell(const at::Tensor& x, const at::Tensor& h, const at::Tensor& w_ih, const at::Tensor& w_hh,
                    const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh,
                    c10::string_view nonlinearity) {
  const bool relu = is_relu(nonlinearity);
  cell_shape(x, h, w_ih, w_hh, b_ih, b_hh);
  check_cuda(x, "rnn_cell");
  const c10::cuda::CUDAGuard guard(x.device());
  if (is_reduced(x)) return in_float32(rnn_cell, x.scalar_type(), x, h, w_ih, w_hh, b_ih, b_hh, nonlinearity);
  // Two cuBLAS calls and one elementwise kernel: a step has no sequence to keep on chip.
  at::Tensor y = cell_preactivation(x, h, w_ih, w_hh, b_ih, b_hh);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "myrnn_fast::rnn_cell_cuda", [&] {
    C10_CUDA_CHECK(activate<scalar_t>(y.data_ptr<scalar_t>(), y.numel(), relu, c10::cuda::getCurrentCUDAStream()));
  });
  return y;
}

}  // namespace myrnn_fast::cuda

TORCH_LIBRARY_IMPL(myrnn_fast, CUDA, m) {
  m.impl("rnn_forward", &myrnn_fast::cuda::rnn_forward);
  m.impl("rnn_backward", &myrnn_fast::cuda::rnn_backward);
  m.impl("rnn_cell", &myrnn_fast::cuda::rnn_cell);
}
