// The forward's path "gemm" on the CPU, float32 and dense input, where this torch has MKL's
// packed GEMM (ops/rnn_cpu.cpp, packed_columns, says when): each
// thread of ATen's pool owns a block of the step's output columns and a packed copy of the
// matching rows of the recurrent weight, made once per call, and runs its block of every step
// on its own, nonlinearity included. A per-step GEMM call otherwise repacks the whole weight
// every step and splits a thin (B-row) product over the threads again each time; here each
// block of the weight stays packed, and stays in its thread's cache, across the steps.
//
// The packed GEMM is ATen's own (the mkl::_mkl_reorder_linear_weight and mkl::_mkl_linear ops,
// MKL's cblas_sgemm_pack and cblas_sgemm_compute), reached through the dispatcher: where torch
// was built without MKL they do not exist, and the caller keeps the plain per-step loop of
// ops/rnn_layer.h.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/LegacyTypeDispatch.h>

#include <algorithm>
#include <optional>
#include <vector>

namespace myrnn_fast::cpu {

class PackedColumns {
 public:
  // The weight w [N, K] of y = x w^T, packed for x of `batch` rows in one block of output
  // columns per thread; nullopt where MKL's packed GEMM is unavailable.
  static std::optional<PackedColumns> make(const at::Tensor& w, int64_t batch) {
    const Ops* ops = Ops::get();
    if (ops == nullptr || w.scalar_type() != at::kFloat || batch < 1) return std::nullopt;
    PackedColumns p;
    p.batch_ = batch;
    const int64_t n = w.size(0), threads = std::max<int64_t>(1, at::get_num_threads());
    // Blocks of whole 16-column vectors, one per thread.
    const int64_t block = (((n + threads - 1) / threads) + 15) / 16 * 16;
    for (int64_t c0 = 0; c0 < n; c0 += block) p.starts_.push_back(c0);
    p.starts_.push_back(n);
    p.rows_.resize(p.parts());
    p.packed_.resize(p.parts());
    at::parallel_for(0, p.parts(), 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {  // packed on the thread that will use it
        // Worker threads do not inherit the caller's dispatch state: keep autograd out.
        const at::AutoDispatchBelowADInplaceOrView below_autograd;
        p.rows_[b] = w.detach().narrow(0, p.starts_[b], p.starts_[b + 1] - p.starts_[b]).contiguous();
        p.packed_[b] = ops->reorder.call(p.rows_[b], batch);
      }
    });
    return p;
  }

  // For every block, in parallel: epilogue(block_of_y, x w_block^T, c0, c1), where block_of_y
  // points at y[0, c0] (row stride = y.size(1)) and the product is [batch, c1 - c0], contiguous.
  // mkl::_mkl_linear has no out= form, so each block's product is a fresh [batch, block] tensor
  // per step: small beside the block's multiply-adds at the sizes this path is taken for.
  template <typename Epilogue>
  void step(const at::Tensor& x, float* y, int64_t y_stride, const Epilogue& epilogue) const {
    const Ops* ops = Ops::get();
    at::parallel_for(0, parts(), 1, [&](int64_t b0, int64_t b1) {
      const at::AutoDispatchBelowADInplaceOrView below_autograd;
      for (int64_t b = b0; b < b1; ++b) {
        const at::Tensor product = ops->linear.call(x, packed_[b], rows_[b], std::nullopt, batch_);
        epilogue(y + starts_[b], y_stride, product.const_data_ptr<float>(), starts_[b], starts_[b + 1]);
      }
    });
  }

 private:
  struct Ops {
    c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, int64_t)> reorder;
    c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                        const std::optional<at::Tensor>&, int64_t)>
        linear;
    static const Ops* get() {
      static const std::optional<Ops> ops = []() -> std::optional<Ops> {
        auto& dispatcher = c10::Dispatcher::singleton();
        const auto reorder = dispatcher.findSchema({"mkl::_mkl_reorder_linear_weight", ""});
        const auto linear = dispatcher.findSchema({"mkl::_mkl_linear", ""});
        if (!reorder || !linear || !reorder->hasKernelForDispatchKey(c10::DispatchKey::CPU) ||
            !linear->hasKernelForDispatchKey(c10::DispatchKey::CPU))
          return std::nullopt;
        return Ops{reorder->typed<at::Tensor(const at::Tensor&, int64_t)>(),
                   linear->typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                            const std::optional<at::Tensor>&, int64_t)>()};
      }();
      return ops ? &*ops : nullptr;
    }
  };

  int64_t parts() const { return static_cast<int64_t>(starts_.size()) - 1; }

  int64_t batch_ = 0;
  std::vector<int64_t> starts_;   // block b is output columns [starts_[b], starts_[b + 1])
  std::vector<at::Tensor> rows_;  // the weight's rows for block b, contiguous
  std::vector<at::Tensor> packed_;
};

}  // namespace myrnn_fast::cpu
