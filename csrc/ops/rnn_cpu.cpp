// CPU implementations of the myrnn_fast ops: rnn_forward, rnn_backward, rnn_cell.
//
// One call runs a whole sequence. The input projection x W_ih^T + b of every step is one GEMM
// (ATen, so MKL/OpenBLAS), and so are the weight gradients after the reverse recurrence. The
// recurrence itself takes one of two paths (use_kernel_path says which):
//  - the register-tiled kernels of rnn_cpu_kernels.cpp, no allocation or dispatch per step.
//    Batch rows never interact, so each thread of ATen's pool runs the whole sequence for its
//    own share of rows: no synchronization per step at all;
//  - for large hidden sizes with large batches, one BLAS GEMM per step (multi-threaded by the
//    BLAS) written in place, then the vectorized nonlinearity, split over ATen's pool: the loop
//    of rnn_layer.h, which the CUDA ops share, as they share its gradient GEMMs.

#include "ops/rnn_cpu.h"

#include "ops/rnn_checks.h"
#include "kernels/cpu/rnn_cpu_kernels.h"
#include "ops/rnn_layer.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/EmptyTensor.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdlib>
#include <mutex>
#include <string>

namespace myrnn_fast::cpu {

// ---- which kernels run: instruction set and path -------------------------------------------

namespace {

struct Choice {
  const KernelTable* table = nullptr;
  std::string path = "auto";  // "auto" | "kernel" | "blas"
};

std::vector<const KernelTable*> supported_tables() {
  std::vector<const KernelTable*> tables{&kernels_baseline()};
#if defined(MYRNN_HAVE_AVX2) && (defined(__GNUC__) || defined(__clang__))
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) tables.push_back(&kernels_avx2());
#endif
#if defined(MYRNN_HAVE_AVX512) && (defined(__GNUC__) || defined(__clang__))
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq"))
    tables.push_back(&kernels_avx512());
#endif
  return tables;
}

const KernelTable* find_table(std::string_view isa) {
  for (const KernelTable* t : supported_tables())
    if (isa == t->isa) return t;
  return nullptr;
}

Choice& choice() {
  // The best instruction set this CPU has, unless MYRNN_CPU_ISA names another one it has.
  static Choice c = [] {
    Choice init;
    init.table = supported_tables().back();
    if (const char* env = std::getenv("MYRNN_CPU_ISA"); env && *env)
      if (const KernelTable* t = find_table(env)) init.table = t;
    return init;
  }();
  return c;
}

template <typename T> const Kernels<T>& kernels();
template <> const Kernels<float>& kernels<float>() { return choice().table->f32; }
template <> const Kernels<double>& kernels<double>() { return choice().table->f64; }

// Where the register-tiled recurrence beats one BLAS GEMM per step (2 cores, AVX-512, MKL;
// forward and backward alike): every measured shape up to H = 512, by 2x at B = 1; beyond,
// only thin batches, since each 4-row block streams W_hh (4 MB at H = 1024) from L3.
constexpr int64_t kKernelMaxHidden = 512;
constexpr int64_t kKernelMaxBatchAboveThat = 16;
// Below this many multiply-adds a call runs on the calling thread: waking the pool costs more.
constexpr int64_t kParallelMinWork = 1 << 17;

bool use_kernel_path(int64_t hidden, int64_t batch) {
  const std::string& path = choice().path;
  if (path == "kernel") return true;
  if (path == "blas") return false;
  return hidden <= kKernelMaxHidden || (batch > 1 && batch <= kKernelMaxBatchAboveThat);
}

// fn(r0, r1) over [0, batch) rows, one even share per thread of ATen's pool when worth it (rows
// never interact, so each thread runs the whole sequence for its rows).
template <typename F>
void for_rows(int64_t batch, int64_t work, const F& fn) {
  if (batch < 2 || work < kParallelMinWork || at::get_num_threads() == 1) {
    fn(int64_t{0}, batch);
    return;
  }
  at::parallel_for(0, batch, 1, fn);
}

// fn(begin, end) over [0, n) elements, split when large.
template <typename F>
void for_elements(int64_t n, const F& fn) {
  at::parallel_for(0, n, 1 << 15, fn);
}

Steps steps_of(const Layout& l) {
  return {l.steps, l.batch_sizes.data(), l.offsets.data(), l.hidden};
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
  if (is_reduced(x))
    return in_float32(rnn_forward, x.scalar_type(), x, h0, w_ih, w_hh, b_ih, b_hh, batch_sizes, nonlinearity);
  const int64_t H = l.hidden;
  const at::Tensor rows = x.reshape({l.rows, l.input});
  const std::optional<at::Tensor> bias = b_ih ? std::optional<at::Tensor>(*b_ih + *b_hh) : std::nullopt;
  at::Tensor out;
  const at::Tensor h = h0.contiguous();
  at::Tensor h_n = at::empty_like(h);
  if (l.steps == 0) h_n.copy_(h);

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "myrnn_fast::rnn_forward", [&] {
    const Kernels<scalar_t>& k = kernels<scalar_t>();
    // The input projection of every step at once; the recurrence then updates it in place.
    if (l.input == 1) {
      out = at::empty({l.rows, H}, x.options());
      const auto xc = rows.expect_contiguous();
      const auto wc = w_ih.expect_contiguous();
      k.project_univariate(out.data_ptr<scalar_t>(), xc->const_data_ptr<scalar_t>(), wc->const_data_ptr<scalar_t>(),
                           bias ? bias->const_data_ptr<scalar_t>() : nullptr, l.rows, H);
    } else {
      out = bias ? at::addmm(*bias, rows, w_ih.t()) : at::mm(rows, w_ih.t());
    }
    if (use_kernel_path(H, l.batch)) {
      const at::Tensor w_hh_t = w_hh.t().contiguous();
      const Steps s = steps_of(l);
      for_rows(l.batch, l.rows * H * H, [&](int64_t r0, int64_t r1) {
        k.forward(s, out.data_ptr<scalar_t>(), h.const_data_ptr<scalar_t>(), w_hh_t.const_data_ptr<scalar_t>(),
                  h_n.data_ptr<scalar_t>(), relu, r0, r1);
      });
      return;
    }
    gemm_forward(out, h, w_hh, h_n, l, [&](const at::Tensor& cur) {
      scalar_t* y = cur.data_ptr<scalar_t>();
      for_elements(cur.numel(), [&](int64_t i0, int64_t i1) { k.activate(y + i0, i1 - i0, relu); });
    });
  });
  return {out.view(output_sizes(x, H)), h_n};
}

// ---- backward -------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> rnn_backward(
    const std::optional<at::Tensor>& grad_out, const std::optional<at::Tensor>& grad_h_n, const at::Tensor& x,
    const at::Tensor& h0, const at::Tensor& w_ih, const at::Tensor& w_hh, const at::Tensor& out,
    const std::optional<at::Tensor>& batch_sizes, c10::string_view nonlinearity, bool need_grad_x) {
  const bool relu = is_relu(nonlinearity);
  const Layout l = layer_layout(x, h0, w_ih, w_hh, std::nullopt, std::nullopt, batch_sizes);
  const int64_t H = l.hidden, B = l.batch, N = l.rows;
  const auto [go, ghn] = incoming_grads(grad_out, grad_h_n, x, out, l);
  if (is_reduced(x))
    return in_float32(rnn_backward, x.scalar_type(), grad_out, grad_h_n, x, h0, w_ih, w_hh, out, batch_sizes,
                      nonlinearity, need_grad_x);
  const at::Tensor y = out.reshape({N, H}).contiguous();
  const at::Tensor w = w_hh.contiguous();
  at::Tensor dz = at::empty({N, H}, y.options());

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "myrnn_fast::rnn_backward", [&] {
    const Kernels<scalar_t>& k = kernels<scalar_t>();
    const scalar_t* go_p = go.defined() ? go.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* ghn_p = ghn.defined() ? ghn.const_data_ptr<scalar_t>() : nullptr;
    if (use_kernel_path(H, l.batch)) {
      const Steps s = steps_of(l);
      for_rows(B, N * H * H, [&](int64_t r0, int64_t r1) {
        k.backward(s, dz.data_ptr<scalar_t>(), go_p, ghn_p, y.const_data_ptr<scalar_t>(),
                   w.const_data_ptr<scalar_t>(), relu, r0, r1);
      });
      return;
    }
    gemm_backward(dz, go, ghn, y, w, l, [&](const at::Tensor& g_t, const at::Tensor& y_t) {
      scalar_t* g = g_t.data_ptr<scalar_t>();
      const scalar_t* yp = y_t.const_data_ptr<scalar_t>();
      for_elements(g_t.numel(), [&](int64_t i0, int64_t i1) { k.mul_dact(g + i0, yp + i0, i1 - i0, relu); });
    });
  });
  return layer_grads(dz, x, h0, y, w_ih, w, ghn, l, need_grad_x);
}

// ---- one RNNCell step -----------------------------------------------------------------------

at::Tensor rnn_cell(const at::Tensor& x, const at::Tensor& h, const at::Tensor& w_ih, const at::Tensor& w_hh,
                    const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh,
                    c10::string_view nonlinearity) {
  const bool relu = is_relu(nonlinearity);
  const CellShape l = cell_shape(x, h, w_ih, w_hh, b_ih, b_hh);
  if (is_reduced(x)) return in_float32(rnn_cell, x.scalar_type(), x, h, w_ih, w_hh, b_ih, b_hh, nonlinearity);
  const int64_t B = l.batch, I = l.input, H = l.hidden;
  at::Tensor y;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "myrnn_fast::rnn_cell", [&] {
    const Kernels<scalar_t>& k = kernels<scalar_t>();
    if (B * H * (I + H) <= kParallelMinWork) {
      // Small enough that one pass of dot products beats three GEMM calls and their dispatch.
      y = at::detail::empty_cpu({B, H}, x.scalar_type(), /*pin_memory=*/false);  // no dispatch
      const auto xc = x.expect_contiguous(), hc = h.expect_contiguous();
      const auto wi = w_ih.expect_contiguous(), wh = w_hh.expect_contiguous();
      c10::MaybeOwned<at::Tensor> bi, bh;
      if (b_ih) {
        bi = b_ih->expect_contiguous();
        bh = b_hh->expect_contiguous();
      }
      k.cell(xc->const_data_ptr<scalar_t>(), hc->const_data_ptr<scalar_t>(), wi->const_data_ptr<scalar_t>(),
             wh->const_data_ptr<scalar_t>(), b_ih ? bi->const_data_ptr<scalar_t>() : nullptr,
             b_ih ? bh->const_data_ptr<scalar_t>() : nullptr, y.data_ptr<scalar_t>(), B, I, H, relu);
      return;
    }
    y = b_ih ? at::addmm(*b_ih + *b_hh, x, w_ih.t()) : at::mm(x, w_ih.t());
    y.addmm_(h, w_hh.t());
    scalar_t* p = y.data_ptr<scalar_t>();
    for_elements(B * H, [&](int64_t i0, int64_t i1) { k.activate(p + i0, i1 - i0, relu); });
  });
  return y;
}

// ---- knobs for tests and benchmarks ---------------------------------------------------------

std::string cpu_isa() { return choice().table->isa; }

std::vector<std::string> cpu_isas() {
  std::vector<std::string> names;
  for (const KernelTable* t : supported_tables()) names.emplace_back(t->isa);
  return names;
}

void set_cpu_isa(const std::string& isa) {
  const KernelTable* t = find_table(isa);
  TORCH_CHECK_VALUE(t, "myrnn_fast: instruction set '", isa, "' is not available on this CPU/build");
  choice().table = t;
}

std::string cpu_path() { return choice().path; }

void set_cpu_path(const std::string& path) {
  TORCH_CHECK_VALUE(path == "auto" || path == "kernel" || path == "blas", "myrnn_fast: unknown CPU path '", path,
                    "'; choose auto, kernel or blas");
  choice().path = path;
}

}  // namespace myrnn_fast::cpu

TORCH_LIBRARY_IMPL(myrnn_fast, CPU, m) {
  m.impl("rnn_forward", &myrnn_fast::cpu::rnn_forward);
  m.impl("rnn_backward", &myrnn_fast::cpu::rnn_backward);
  m.impl("rnn_cell", &myrnn_fast::cpu::rnn_cell);
}
