// CPU implementations of the myrnn_fast ops: rnn_forward, rnn_backward, rnn_cell.
//
// One call runs a whole sequence. The input projection x W_ih^T + b of every step is one GEMM
// (ATen, so MKL/OpenBLAS/oneDNN) or one pass of the kernels' tiles (choose_projection), and so
// are the weight gradients after the reverse recurrence (ops/rnn_layer.h, or Kernels::grads).
// The recurrence itself takes one of two paths (knob cpu_path; choose_path):
//  - "tiles": the register-tiled kernels of kernels/cpu/rnn_cpu_kernels.cpp, no allocation or
//    dispatch per step. Batch rows never interact, so each thread of ATen's pool runs the whole
//    sequence for its own share of rows: no synchronization per step at all;
//  - "gemm": one BLAS GEMM per step (multi-threaded by the BLAS) written in place, then the
//    vectorized nonlinearity, split over ATen's pool: the loop of ops/rnn_layer.h, which the CUDA
//    ops share, as they share its gradient GEMMs.
// Which one wins depends on the machine (cores, caches, vector width, the BLAS), so under "auto"
// the first call of each kind times both and the faster serves the rest (ops/autotune.h); the
// static size thresholds decide only with knob cpu_autotune off.

#include "ops/rnn_cpu.h"

#include "kernels/cpu/rnn_cpu_kernels.h"
#include "ops/autotune.h"
#include "ops/knobs.h"
#include "ops/rnn_cpu_gemm.h"
#include "ops/rnn_checks.h"
#include "ops/rnn_layer.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/EmptyTensor.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <string>
#include <chrono>
#include <cstring>
#include <string_view>
#include <type_traits>
#include <vector>

namespace myrnn_fast::cpu {

// ---- which kernels run: instruction set and path -------------------------------------------

namespace {

// The kernel tables this CPU and build can run, worst to best.
const std::vector<const KernelTable*>& supported_tables() {
  static const std::vector<const KernelTable*> tables = [] {
    std::vector<const KernelTable*> t{&kernels_baseline()};
#if defined(__GNUC__) || defined(__clang__)
    __builtin_cpu_init();  // this may run before the constructors that would do it
#endif
#if defined(MYRNN_HAVE_AVX2) && (defined(__GNUC__) || defined(__clang__))
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
      t.push_back(&kernels_avx2());
#endif
#if defined(MYRNN_HAVE_AVX512) && (defined(__GNUC__) || defined(__clang__))
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq"))
      t.push_back(&kernels_avx512());
#endif
#if defined(MYRNN_HAVE_AVX512BF16) && (defined(__GNUC__) || defined(__clang__))
    if (t.back()->isa == std::string_view("avx512") && __builtin_cpu_supports("avx512bf16"))
      t.push_back(&kernels_avx512bf16());
#endif
    return t;
  }();
  return tables;
}

// The table knob cpu_isa selects: its choices are "auto" (the best), then supported_tables().
const KernelTable& table() {
  const auto& tables = supported_tables();
  const int64_t choice = knobs::cpu_isa.get();
  return choice == 0 ? *tables.back() : *tables[choice - 1];
}

// ATen's scalar type -> the kernels' storage type (same size and bits).
template <typename T> struct Storage { using type = T; };
template <> struct Storage<at::BFloat16> { using type = bf16; };
template <> struct Storage<at::Half> { using type = f16; };
template <typename T> using storage_t = typename Storage<T>::type;

template <typename S> const Kernels<S>& kernels();
template <> const Kernels<float>& kernels<float>() { return table().f32; }
template <> const Kernels<double>& kernels<double>() { return table().f64; }
template <> const Kernels<bf16>& kernels<bf16>() { return table().b16; }
template <> const Kernels<f16>& kernels<f16>() { return table().h16; }

// A matrix (any strides, a transposed view above all) as a contiguous float32 copy, in one pass
// over its strides (ATen's converting copy of a transposed view costs 5x this).
at::Tensor float_copy(const at::Tensor& m) {
  at::Tensor f = at::empty(m.sizes(), m.options().dtype(at::kFloat));
  const int64_t rows = m.size(0), cols = m.size(1), s0 = m.stride(0), s1 = m.stride(1);
  float* dst = f.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, m.scalar_type(), "float_copy", [&] {
    const scalar_t* src = m.const_data_ptr<scalar_t>();
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) dst[r * cols + c] = static_cast<float>(src[r * s0 + c * s1]);
  });
  return f;
}

// The H x H matrix m (forward: W_hh^T, backward: W_hh) as kernels `k` read it (Kernels::matrix):
// a contiguous copy in the storage type or in float32, or with rows k and k + 1 interleaved.
template <typename S>
at::Tensor recurrent_matrix(const Kernels<S>& k, const at::Tensor& m) {
  if (k.matrix == Matrix::kStorage) return m.contiguous();
  if (k.matrix == Matrix::kFloat) return float_copy(m);
  const int64_t H = m.size(0);
  const at::Tensor even = H % 2 ? at::constant_pad_nd(m, {0, 0, 0, 1}) : m;
  return even.reshape({(H + 1) / 2, 2, H}).transpose(1, 2).contiguous();
}

// A tensor's data as the kernels' storage type.
template <typename T> storage_t<T>* ptr(const at::Tensor& t) { return reinterpret_cast<storage_t<T>*>(t.data_ptr<T>()); }
template <typename T> const storage_t<T>* cptr(const at::Tensor& t) {
  return reinterpret_cast<const storage_t<T>*>(t.const_data_ptr<T>());
}

// float32, float64, and float16 / bfloat16 read and written as they are, computed in float.
#define MYRNN_DISPATCH(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

// Whether ATen's CPU GEMM in this dtype is far below BLAS speed: oneDNN runs bfloat16 GEMMs on
// AVX-512 (avx512_core) and float16 ones only with AVX512-FP16; elsewhere ATen falls back to a
// plain loop, an order of magnitude slower than the float32 BLAS GEMM. There the op's GEMMs take float32 copies of
// their operands (in_float32), while the recurrence still reads and writes the 16-bit storage.
bool slow_gemm(at::ScalarType dtype) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  static const bool bf16_slow = !(__builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
                                  __builtin_cpu_supports("avx512dq"));
  static const bool f16_slow = !__builtin_cpu_supports("avx512fp16");
  return dtype == at::kBFloat16 ? bf16_slow : dtype == at::kHalf && f16_slow;
#else
  return false;
#endif
}

// The thresholds' choice: what "auto" runs with autotuning off.
bool static_tiles(int64_t hidden, int64_t batch) {
  return hidden <= knobs::cpu_tiles_max_hidden.get() || (batch > 1 && batch <= knobs::cpu_tiles_max_batch.get());
}

// torch's name for a dtype, as Python prints it.
std::string dtype_name(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return "float32";
    case at::kDouble: return "float64";
    case at::kHalf: return "float16";
    case at::kBFloat16: return "bfloat16";
    default: return c10::toString(dtype);
  }
}

// How one call runs its recurrence or forms its gradients: a path, or "measure both" (the first
// call of its kind).
struct PathChoice {
  std::optional<autotune::Path> path;  // empty: time both, keep the faster (autotune::measure)
  autotune::Key key;
};

// The key of a call's kind (ops/autotune.h): `input` does not count for the recurrences.
autotune::Key tuning_key(autotune::Pass pass, const Layout& l, at::ScalarType dtype) {
  return {pass,         l.hidden,          autotune::is_recurrence(pass) ? 0 : l.input, autotune::bucket(l.batch),
          autotune::bucket(l.seq_len), dtype_name(dtype), at::get_num_threads(), table().isa};
}

// The route a knob forces, if any: cpu_path, cpu_grads, cpu_cell and cpu_projection each list
// auto (nothing forced), then the kernels' route, then gemm.
static_assert(static_cast<int>(knobs::CpuPath::kTiles) == 1 && static_cast<int>(knobs::CpuPath::kGemm) == 2 &&
              static_cast<int>(knobs::CpuBf16Products::kPairs) == 1 &&
              static_cast<int>(knobs::CpuBf16Products::kFloat32) == 2 &&
              static_cast<int>(knobs::CpuGrads::kKernels) == 1 && static_cast<int>(knobs::CpuGrads::kGemm) == 2 &&
              static_cast<int>(knobs::CpuCell::kKernels) == 1 && static_cast<int>(knobs::CpuCell::kGemm) == 2 &&
              static_cast<int>(knobs::CpuProjection::kKernels) == 1 &&
              static_cast<int>(knobs::CpuProjection::kGemm) == 2);
std::optional<autotune::Path> forced(const knobs::Knob& knob) {
  switch (knob.get()) {
    case 1: return autotune::Path::kKernels;
    case 2: return autotune::Path::kGemm;
    default: return std::nullopt;
  }
}

// The cached choice for this kind of call, or "measure both" on its first call.
PathChoice measured(autotune::Pass pass, const Layout& l, at::ScalarType dtype) {
  autotune::Key key = tuning_key(pass, l, dtype);
  return {autotune::lookup(key), std::move(key)};
}

PathChoice choose_path(const Layout& l, at::ScalarType dtype, bool backward) {
  using autotune::Path;
  if (const auto path = forced(knobs::cpu_path)) return {*path, {}};
  // Path auto never runs a slow 16-bit GEMM once per step: nothing to measure there.
  if (slow_gemm(dtype)) return {Path::kKernels, {}};
  const Path fixed = static_tiles(l.hidden, l.batch) ? Path::kKernels : Path::kGemm;
  if (!knobs::cpu_autotune.get() || l.seq_len == 0) return {fixed, {}};
  return measured(backward ? autotune::Pass::kBackward : autotune::Pass::kForward, l, dtype);
}

template <typename F>
double seconds_of(const F& fn) {
  const auto start = std::chrono::steady_clock::now();
  fn();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

// The first steps of a sequence, at most `steps`, as the recurrence kernels see them, and the
// number of rows they cover: what recurrence_kernels times its candidates on, so that a first
// call holds a copy of a few steps' rows, not of the whole sequence's.
Sequence prefix(const Sequence& s, int64_t steps, int64_t* rows) {
  Sequence p = s;
  p.seq_len = std::min(s.seq_len, steps);
  const Step last = step_at(p, p.seq_len - 1);
  *rows = last.offset + last.batch_size;
  return p;
}
constexpr int64_t kMeasuredSteps = 64;

// The kernels the tiles run a recurrence with. bfloat16 with AVX512-BF16 has two sets: those of
// KernelTable::b16, whose vdpbf16ps multiplies pairs of the 16-bit state by pairs of W_hh's rows,
// and those of KernelTable::b16_float, FMAs on float32 copies of the state and of W_hh (same
// conversions, same rounding of every stored value; the sums differ in order only). Two products
// per instruction should win, but where vdpbf16ps issues at half an FMA's rate (measured on
// Sapphire Rapids: the pairs were 1.1-1.8x slower at every shape tried, one row or many) it does
// not. So knob cpu_bf16_products picks, and under auto the first call of each kind times both
// (with cpu_autotune 0 the float32 copies serve): run(kernels) runs the recurrence over the first
// kMeasuredSteps steps only (every step costs the same) into buffers of its own, copies of its
// inputs made off the clock, and returns its seconds.
template <typename S, typename Run>
const Kernels<S>& recurrence_kernels(const Layout& l, bool backward, const Run& run) {
  const Kernels<S>& k = kernels<S>();
  if constexpr (std::is_same_v<S, bf16>) {
    if (k.matrix != Matrix::kBf16Pairs) return k;
    using autotune::Path;
    const auto pick = [&](Path path) -> const Kernels<S>& { return path == Path::kKernels ? k : table().b16_float; };
    if (const auto path = forced(knobs::cpu_bf16_products)) return pick(*path);
    if (!knobs::cpu_autotune.get() || l.seq_len == 0) return pick(Path::kGemm);
    const PathChoice c =
        measured(backward ? autotune::Pass::kBf16Backward : autotune::Pass::kBf16Forward, l, at::kBFloat16);
    if (c.path) return pick(*c.path);
    return pick(autotune::measure(c.key, [&](Path path) { return run(pick(path)); }));
  }
  return k;
}

// fn(r0, r1) over [0, batch) rows, one even share per thread of ATen's pool when `work` (in
// multiply-adds) is worth waking it for (rows never interact, so each thread runs the whole
// sequence for its rows).
template <typename F>
void for_rows(int64_t batch, int64_t work, const F& fn) {
  if (batch < 2 || work < knobs::cpu_parallel_min_work.get() || at::get_num_threads() == 1) {
    fn(int64_t{0}, batch);
    return;
  }
  at::parallel_for(0, batch, 1, fn);
}

// The rows of each of for_parts's blocks (the last may have fewer).
inline int64_t part_rows(int64_t batch, int64_t parts) { return (batch + parts - 1) / parts; }

// fn(part, r0, r1) over [0, batch) rows in `parts` even blocks of consecutive rows, block `part`
// on one thread of ATen's pool: for_rows's split, by block index, so that two parallel regions
// can hand each block a buffer of its own (dz_parts).
template <typename F>
void for_parts(int64_t batch, int64_t parts, const F& fn) {
  const int64_t size = part_rows(batch, parts);
  at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p)
      if (p * size < batch) fn(p, p * size, std::min(batch, (p + 1) * size));
  });
}

// fn(begin, end) over [0, n) elements, split when large.
template <typename F>
void for_elements(int64_t n, const F& fn) {
  at::parallel_for(0, n, 1 << 15, fn);
}

// The multiply-adds of a backward's weight gradients (and of grad x when asked).
int64_t grads_work(const Layout& l, bool need_grad_x) {
  return l.rows * l.hidden * (l.hidden + l.input * (need_grad_x ? 2 : 1));
}

// Where rnn_backward forms its gradients: in the kernels (Kernels::grads: kKernels) or as ATen
// GEMMs (layer_grads: kGemm). Each of those five or six GEMM calls costs microseconds before it
// multiplies anything, more than the whole product at small sizes, where the kernels' register
// tiles run at BLAS speed; from some size on the GEMMs' blocking wins. Under cpu_grads auto the
// first call of each kind measures both (cpu_autotune 1), or cpu_grads_kernels_max_work decides.
// A 16-bit dtype whose ATen GEMM is slow (slow_gemm) takes the kernels at any size: they read the
// 16-bit storage directly, with no float32 copies.
PathChoice choose_grads(const Layout& l, at::ScalarType dtype, bool need_grad_x) {
  using autotune::Path;
  if (l.seq_len == 0) return {Path::kGemm, {}};  // grad_h0 is then grad_h_n itself: layer_grads covers it
  if (const auto path = forced(knobs::cpu_grads)) return {*path, {}};
  if (slow_gemm(dtype)) return {Path::kKernels, {}};
  if (!knobs::cpu_autotune.get())
    return {grads_work(l, need_grad_x) <= knobs::cpu_grads_kernels_max_work.get() ? Path::kKernels : Path::kGemm, {}};
  return measured(need_grad_x ? autotune::Pass::kGradsDx : autotune::Pass::kGrads, l, dtype);
}

// How rnn_cell computes a step: by the kernels' dot products (kKernels) or ATen GEMMs (kGemm).
// Under cpu_cell auto, measured per kind with cpu_autotune 1; with it off, the kernels up to a
// size where one pass of dot products still beats three GEMM calls and their dispatch (several
// times further with AVX512-BF16's pairwise dot products, `pairs`, against oneDNN's bfloat16
// GEMM, whose fixed cost per call exceeds float32's).
PathChoice choose_cell(const Layout& l, at::ScalarType dtype, bool pairs) {
  using autotune::Path;
  if (const auto path = forced(knobs::cpu_cell)) return {*path, {}};
  if (knobs::cpu_autotune.get()) return measured(autotune::Pass::kCell, l, dtype);
  const int64_t dot_max_work = knobs::cpu_parallel_min_work.get() * (pairs ? 8 : 1);
  return {l.batch * l.hidden * (l.input + l.hidden) <= dot_max_work ? Path::kKernels : Path::kGemm, {}};
}

// How rnn_forward forms its input projection (input size above 1): by the kernels' register tiles
// (kKernels: no GEMM call, no dispatch) or one ATen GEMM (kGemm: BLAS blocking, and AMX or
// AVX512-BF16 in oneDNN's bfloat16). Under cpu_projection auto, measured per kind with
// cpu_autotune 1; with it off, the GEMM, except where the dtype's GEMM is slow (slow_gemm), whose
// float32 copies the kernels do without.
PathChoice choose_projection(const Layout& l, at::ScalarType dtype) {
  using autotune::Path;
  if (const auto path = forced(knobs::cpu_projection)) return {*path, {}};
  if (!knobs::cpu_autotune.get() || l.rows == 0) return {slow_gemm(dtype) ? Path::kKernels : Path::kGemm, {}};
  return measured(autotune::Pass::kProjection, l, dtype);
}

// rnn_backward's gradients (grad_x, grad_h0, grad_w_ih, grad_w_hh, grad_b) from dz by the kernels:
// each thread of ATen's pool sums its share of rows into an accumulator of its own, in float32
// (float64 for float64), and one pass adds those and rounds each gradient once. With dz_parts > 1,
// dz is [dz_parts, N, H] and block p of for_parts's rows is in dz[p] (see dz_parts).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> kernel_grads(
    const at::Tensor& dz, const at::Tensor& x, const at::Tensor& h0, const at::Tensor& y, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const Layout& l, bool need_grad_x, int64_t dz_parts) {
  const int64_t B = l.batch, H = l.hidden, I = l.input, N = l.rows;
  const auto type = x.scalar_type();
  auto empty = [&](at::IntArrayRef sizes) { return at::detail::empty_cpu(sizes, type, /*pin_memory=*/false); };
  at::Tensor grad_x = need_grad_x ? empty(x.sizes()) : empty({0});
  at::Tensor grad_h0 = empty({B, H}), grad_w_ih = empty({H, I}), grad_w_hh = empty({H, H}), grad_b = empty({H});
  const auto xc = x.expect_contiguous(), h0c = h0.expect_contiguous(), wi = w_ih.expect_contiguous();
  MYRNN_DISPATCH(type, "myrnn_fast::rnn_backward", [&] {
    using S = storage_t<scalar_t>;
    using C = Accumulator<S>::type;
    const auto& k = kernels<S>();
    const Sequence s = l.sequence();
    const int64_t stride = grads_size(H, I);
    const int64_t parts = std::max<int64_t>(1, at::get_num_threads());
    std::vector<C> acc(parts * stride, C(0));
    // The calling thread's accumulator.
    const auto mine = [&] { return acc.data() + std::min<int64_t>(at::get_thread_num(), parts - 1) * stride; };
    const int64_t work = grads_work(l, need_grad_x);
    if (!l.packed && B < parts && l.seq_len >= 2 * parts && work >= knobs::cpu_parallel_min_work.get()) {
      // Fewer rows than threads (B = 1 above all): the weight gradients are sums over every
      // (step, row) pair, so each thread takes a span of steps instead, all rows. A span from
      // step t0 is a sequence of its own whose h0 is step t0 - 1's output; only the first span's
      // grad h0 is the call's (the others pass none).
      at::parallel_for(0, l.seq_len, 1, [&](int64_t t0, int64_t t1) {
        Sequence span = s;
        span.seq_len = t1 - t0;
        const int64_t row = t0 * B;
        const auto* prev = t0 == 0 ? cptr<scalar_t>(*h0c) : cptr<scalar_t>(y) + (row - B) * H;
        auto* gh0 = t0 == 0 ? ptr<scalar_t>(grad_h0) : nullptr;
        k.grads(span, I, cptr<scalar_t>(dz) + row * H, cptr<scalar_t>(*xc) + row * I, prev,
                cptr<scalar_t>(y) + row * H, cptr<scalar_t>(*wi), cptr<scalar_t>(w_hh), mine(),
                need_grad_x ? ptr<scalar_t>(grad_x) + row * I : nullptr, gh0, 0, B);
      });
    } else if (dz_parts > 1) {
      // Each block of rows reads its own dz, and writes its grad x rows into a part of its own
      // too (in grad_x a step's rows of all blocks share cache lines), gathered after.
      const at::Tensor gx_parts = need_grad_x ? empty({dz_parts, N, I}) : at::Tensor();
      for_parts(B, dz_parts, [&](int64_t p, int64_t r0, int64_t r1) {
        k.grads(s, I, cptr<scalar_t>(dz) + p * N * H, cptr<scalar_t>(*xc), cptr<scalar_t>(*h0c), cptr<scalar_t>(y),
                cptr<scalar_t>(*wi), cptr<scalar_t>(w_hh), mine(),
                need_grad_x ? ptr<scalar_t>(gx_parts) + p * N * I : nullptr, ptr<scalar_t>(grad_h0), r0, r1);
      });
      if (need_grad_x) {
        const int64_t size = part_rows(B, dz_parts);  // for_parts's blocks
        const S* from = cptr<scalar_t>(gx_parts);
        S* to = ptr<scalar_t>(grad_x);
        for (int64_t t = 0; t < s.seq_len; ++t) {
          const Step step = step_at(s, t);
          for (int64_t p = 0; p * size < step.batch_size; ++p) {
            const int64_t n = step.offset + p * size, count = std::min(step.batch_size, (p + 1) * size) - p * size;
            std::memcpy(to + n * I, from + p * N * I + n * I, count * I * sizeof(S));
          }
        }
      }
    } else {
      for_rows(B, work, [&](int64_t r0, int64_t r1) {
        k.grads(s, I, cptr<scalar_t>(dz), cptr<scalar_t>(*xc), cptr<scalar_t>(*h0c), cptr<scalar_t>(y),
                cptr<scalar_t>(*wi), cptr<scalar_t>(w_hh), mine(), need_grad_x ? ptr<scalar_t>(grad_x) : nullptr,
                ptr<scalar_t>(grad_h0), r0, r1);
      });
    }
    k.grads_finish(acc.data(), parts, stride, H, I, ptr<scalar_t>(grad_w_hh), ptr<scalar_t>(grad_w_ih),
                   ptr<scalar_t>(grad_b));
  });
  return {grad_x, grad_h0, grad_w_ih, grad_w_hh, grad_b};
}

// b_ih + b_hh in the kernels' compute type C (float32 for 16-bit storage), each sum rounded once
// to C, or empty for none: the bias the kernels' input projections add (Kernels::project, and the
// Univariate of input size 1), by a plain loop: at small sizes an ATen call costs more than the sums.
template <typename scalar_t, typename C>
std::vector<C> compute_bias(const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh) {
  if (!b_ih) return {};
  const auto bi = b_ih->expect_contiguous(), bh = b_hh->expect_contiguous();
  const scalar_t *pi = bi->const_data_ptr<scalar_t>(), *ph = bh->const_data_ptr<scalar_t>();
  std::vector<C> sum(bi->numel());
  for (size_t j = 0; j < sum.size(); ++j) sum[j] = static_cast<C>(pi[j]) + static_cast<C>(ph[j]);
  return sum;
}

// The input projection of every step by the kernels (Kernels::project): W_ih^T and the bias sum
// in the kernels' compute type once per call (float32 for 16-bit storage: an I x H copy, as
// recurrent_matrix makes of W_hh), then the rows split over ATen's pool when the work is worth it.
template <typename scalar_t>
at::Tensor kernel_projection(const Kernels<storage_t<scalar_t>>& k, const at::Tensor& rows, const at::Tensor& w_ih,
                             const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh) {
  using S = storage_t<scalar_t>;
  using C = typename Accumulator<S>::type;
  const int64_t N = rows.size(0), I = rows.size(1), H = w_ih.size(0);
  const at::Tensor w_t = std::is_same_v<C, float> ? float_copy(w_ih.t()) : w_ih.t().contiguous();
  const std::vector<C> bias = compute_bias<scalar_t, C>(b_ih, b_hh);
  at::Tensor out = at::detail::empty_cpu({N, H}, rows.scalar_type(), /*pin_memory=*/false);
  const auto xc = rows.expect_contiguous();
  const int64_t grain = std::max<int64_t>(1, knobs::cpu_parallel_min_work.get() / std::max<int64_t>(1, I * H));
  at::parallel_for(0, N, grain, [&](int64_t r0, int64_t r1) {
    k.project(ptr<scalar_t>(out) + r0 * H, cptr<scalar_t>(*xc) + r0 * I, w_t.const_data_ptr<C>(),
              b_ih ? bias.data() : nullptr, r1 - r0, I, H);
  });
  return out;
}

// The forward's path "gemm" with W_hh packed per thread (ops/rnn_cpu_gemm.h), where it applies:
// float32, dense input (one batch size for every step: the packing is made for it), and hidden
// sizes from 256, below which MKL's pack buffer is many times the weight's own size. (The
// backward keeps the plain loop: its recurrence is a smaller share of its time, beside the
// gradient GEMMs, and packing W_hh's transpose too did not pay there when measured.)
template <typename T>
std::optional<PackedColumns> packed_columns(const Layout& l, const at::Tensor& w) {
  if constexpr (!std::is_same_v<T, float>) return std::nullopt;
  if (l.packed || l.seq_len == 0 || l.hidden < 256) return std::nullopt;
  return PackedColumns::make(w, l.batch);
}

// y [rows, n] at stride `stride` += product (contiguous), row by row, then fn(row, n).
template <typename F>
void add_rows(float* y, int64_t stride, const float* product, int64_t rows, int64_t n, const F& fn) {
  for (int64_t r = 0; r < rows; ++r) {
    float* yr = y + r * stride;
    const float* pr = product + r * n;
    for (int64_t j = 0; j < n; ++j) yr[j] += pr[j];
    fn(yr, n);
  }
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
  const int64_t H = l.hidden;
  const at::Tensor rows = x.reshape({l.rows, l.input});
  at::Tensor out;
  const at::Tensor h = h0.contiguous();
  at::Tensor h_n = at::empty_like(h);
  if (l.seq_len == 0) h_n.copy_(h);

  MYRNN_DISPATCH(x.scalar_type(), "myrnn_fast::rnn_forward", [&] {
    using S = storage_t<scalar_t>;
    const auto& k = kernels<S>();
    const PathChoice choice = choose_path(l, x.scalar_type(), /*backward=*/false);
    // Univariate input (I = 1): where the tiles run, they form its projections in their registers
    // (Univariate); the other path, and a first call that times both, take them from one pass of
    // project_univariate (the same values, from the same w and bias sum).
    using C = typename Accumulator<S>::type;
    const bool fold = l.input == 1 && choice.path == autotune::Path::kKernels;
    c10::MaybeOwned<at::Tensor> xc;  // input size 1: x, which the tiles read through `univariate`
    std::vector<C> u_w, u_bias;
    Univariate<S> univariate;
    // The input projection of every step at once; the recurrence then updates it in place.
    if (l.input == 1) {
      out = at::empty({l.rows, H}, x.options());
      xc = rows.expect_contiguous();
      const auto wc = w_ih.expect_contiguous();
      const scalar_t* w = wc->const_data_ptr<scalar_t>();
      u_w.assign(w, w + H);
      u_bias = compute_bias<scalar_t, C>(b_ih, b_hh);
      univariate = {cptr<scalar_t>(*xc), u_w.data(), b_ih ? u_bias.data() : nullptr};
      if (!fold) k.project_univariate(ptr<scalar_t>(out), univariate, l.rows, H);
    } else {
      const auto project = [&](autotune::Path path) {
        if (path == autotune::Path::kKernels) return kernel_projection<scalar_t>(k, rows, w_ih, b_ih, b_hh);
        if (slow_gemm(x.scalar_type()))
          return in_float32(input_projection, x.scalar_type(), rows, w_ih, summed_bias(b_ih, b_hh));
        return input_projection(rows, w_ih, summed_bias(b_ih, b_hh));
      };
      const PathChoice projection = choose_projection(l, x.scalar_type());
      if (projection.path) {
        out = project(*projection.path);
      } else {
        at::Tensor outs[2];
        const autotune::Path winner = autotune::measure(
            projection.key, [&](autotune::Path path) { return seconds_of([&] { outs[static_cast<int>(path)] = project(path); }); },
            /*pairs=*/2, /*warm_up=*/true);
        out = outs[static_cast<int>(winner)];
      }
    }
    // The tiles' recurrence by kernels `kt` over the projections in `o`, in place (or into `o`,
    // forming univariate input's projections where `fold`).
    const auto tiles = [&](const Kernels<S>& kt, const Sequence& s, const at::Tensor& o, const at::Tensor& hn) {
      const at::Tensor w_hh_t = recurrent_matrix(kt, w_hh.t());
      for_rows(l.batch, l.rows * H * H, [&](int64_t r0, int64_t r1) {
        kt.forward(s, ptr<scalar_t>(o), fold ? &univariate : nullptr, cptr<scalar_t>(h), w_hh_t.const_data_ptr(),
                   ptr<scalar_t>(hn), relu, r0, r1);
      });
    };
    // The recurrence over the projections in `o`, in place, by one path; final states into `hn`.
    const auto recur = [&](autotune::Path path, const at::Tensor& o, const at::Tensor& hn) {
      if (path == autotune::Path::kKernels) {
        const Kernels<S>& kt = recurrence_kernels<S>(l, /*backward=*/false, [&](const Kernels<S>& candidate) {
          int64_t rows = 0;
          const Sequence first = prefix(l.sequence(), kMeasuredSteps, &rows);
          const at::Tensor o_copy = o.narrow(0, 0, rows).clone(), hn_copy = at::empty_like(hn);  // off the clock
          return seconds_of([&] { tiles(candidate, first, o_copy, hn_copy); });
        });
        return tiles(kt, l.sequence(), o, hn);
      }
      if (const auto packed = packed_columns<scalar_t>(l, w_hh)) {  // float32 only
        const auto& kf = kernels<float>();
        const int64_t B = l.batch;
        float* o_ptr = o.data_ptr<float>();
        for (int64_t t = 0; t < l.seq_len; ++t) {
          const at::Tensor prev = t == 0 ? h : o.narrow(0, (t - 1) * B, B);
          packed->step(prev, o_ptr + t * B * H, H, [&](float* y, int64_t stride, const float* p, int64_t c0, int64_t c1) {
            add_rows(y, stride, p, B, c1 - c0, [&](float* row, int64_t n) { kf.activate(row, n, relu); });
          });
        }
        hn.copy_(o.narrow(0, (l.seq_len - 1) * B, B));
        return;
      }
      gemm_forward(o, h, w_hh, hn, l, [&](const at::Tensor& cur) {
        auto* y = ptr<scalar_t>(cur);
        for_elements(cur.numel(), [&](int64_t i0, int64_t i1) { k.activate(y + i0, i1 - i0, relu); });
      });
    };
    if (choice.path) return recur(*choice.path, out, h_n);
    // Each timed run starts from its own copy of the projections (made off the clock).
    at::Tensor outs[2], h_ns[2];
    const autotune::Path winner = autotune::measure(choice.key, [&](autotune::Path path) {
      const int i = static_cast<int>(path);
      outs[i] = out.clone();
      h_ns[i] = at::empty_like(h);
      return seconds_of([&] { recur(path, outs[i], h_ns[i]); });
    });
    out = outs[static_cast<int>(winner)];
    h_n = h_ns[static_cast<int>(winner)];
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
  const at::Tensor y = out.reshape({N, H}).contiguous();
  const at::Tensor w = w_hh.contiguous();
  const PathChoice choice = choose_path(l, x.scalar_type(), /*backward=*/true);
  const PathChoice grads_choice = choose_grads(l, x.scalar_type(), need_grad_x);
  // Where the tiles' reverse recurrence and the kernels' gradients both split the rows over the
  // pool (known paths, a batch of at least one row per thread), each block of rows gets a dz of
  // its own ([dz_parts, N, H], each part written only at its block's rows). In one [N, H] dz a
  // thread's rows are one block of every step's span, between other threads' blocks: every
  // cache line beside its own is one another core is writing or has just written, and the
  // prefetchers fetch those, so the cores trade lines for the whole sequence. In a two-thread
  // harness at (176, 26, 1, 32) each thread's recurrence took 56 us against 45 with a dz of its
  // own (41 alone on the machine), its gradients 53 against 42 (37). The cost: dz_parts times
  // dz's memory for the backward's duration, where the kernels run (small sizes).
  const int64_t threads = at::get_num_threads();
  const bool split = choice.path == autotune::Path::kKernels && grads_choice.path == autotune::Path::kKernels &&
                     threads > 1 && B >= threads && N * H * H >= knobs::cpu_parallel_min_work.get();
  const int64_t dz_parts = split ? threads : 1;
  at::Tensor dz = split ? at::empty({dz_parts, N, H}, y.options()) : at::empty({N, H}, y.options());

  MYRNN_DISPATCH(x.scalar_type(), "myrnn_fast::rnn_backward", [&] {
    using S = storage_t<scalar_t>;
    const auto& k = kernels<S>();
    const auto* go_p = go.defined() ? cptr<scalar_t>(go) : nullptr;
    const auto* ghn_p = ghn.defined() ? cptr<scalar_t>(ghn) : nullptr;
    // The reverse recurrence into `d` (every element written, or with `parts` > 1 each part at
    // its block's rows) by one path.
    const auto tiles = [&](const Kernels<S>& kt, const Sequence& s, const at::Tensor& d, int64_t parts = 1) {
      const at::Tensor m = recurrent_matrix(kt, w);
      const auto rows = [&](S* dst, int64_t r0, int64_t r1) {
        kt.backward(s, dst, go_p, ghn_p, cptr<scalar_t>(y), m.const_data_ptr(), relu, r0, r1);
      };
      if (parts > 1)
        for_parts(B, parts, [&](int64_t p, int64_t r0, int64_t r1) { rows(ptr<scalar_t>(d) + p * N * H, r0, r1); });
      else
        for_rows(B, N * H * H, [&](int64_t r0, int64_t r1) { rows(ptr<scalar_t>(d), r0, r1); });
    };
    const auto recur = [&](autotune::Path path, const at::Tensor& d) {
      if (path == autotune::Path::kKernels) {
        const Kernels<S>& kt = recurrence_kernels<S>(l, /*backward=*/true, [&](const Kernels<S>& candidate) {
          int64_t rows = 0;
          const Sequence first = prefix(l.sequence(), kMeasuredSteps, &rows);  // its last step takes grad_h_n
          const at::Tensor d_copy = at::empty({rows, H}, d.options());
          return seconds_of([&] { tiles(candidate, first, d_copy); });
        });
        return tiles(kt, l.sequence(), d, dz_parts);  // 1 wherever the paths are being measured
      }
      gemm_backward(d, go, ghn, y, w, l, [&](const at::Tensor& g_t, const at::Tensor& y_t) {
        auto* g = ptr<scalar_t>(g_t);
        const auto* yp = cptr<scalar_t>(y_t);
        for_elements(g_t.numel(), [&](int64_t i0, int64_t i1) { k.mul_dact(g + i0, yp + i0, i1 - i0, relu); });
      });
    };
    if (choice.path) return recur(*choice.path, dz);
    at::Tensor dzs[2];
    const autotune::Path winner = autotune::measure(choice.key, [&](autotune::Path path) {
      const int i = static_cast<int>(path);
      dzs[i] = at::empty_like(dz);
      return seconds_of([&] { recur(path, dzs[i]); });
    });
    dz = dzs[static_cast<int>(winner)];
  });
  const auto grads = [&](autotune::Path path) {
    if (path == autotune::Path::kKernels) return kernel_grads(dz, x, h0, y, w_ih, w, l, need_grad_x, dz_parts);
    if (slow_gemm(x.scalar_type()))
      return in_float32(layer_grads, x.scalar_type(), dz, x, h0, y, w_ih, w, ghn, l, need_grad_x);
    return layer_grads(dz, x, h0, y, w_ih, w, ghn, l, need_grad_x);
  };
  if (grads_choice.path) return grads(*grads_choice.path);
  decltype(grads(autotune::Path::kGemm)) results[2];
  const autotune::Path winner = autotune::measure(
      grads_choice.key,
      [&](autotune::Path path) {
        const int i = static_cast<int>(path);
        return seconds_of([&] { results[i] = grads(path); });
      },
      /*pairs=*/2, /*warm_up=*/true);
  return std::move(results[static_cast<int>(winner)]);
}

// ---- one RNNCell step -----------------------------------------------------------------------

at::Tensor rnn_cell(const at::Tensor& x, const at::Tensor& h, const at::Tensor& w_ih, const at::Tensor& w_hh,
                    const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh,
                    c10::string_view nonlinearity) {
  const bool relu = is_relu(nonlinearity);
  const Layout l = cell_shape(x, h, w_ih, w_hh, b_ih, b_hh);
  const int64_t B = l.batch, I = l.input, H = l.hidden;
  at::Tensor y;
  MYRNN_DISPATCH(x.scalar_type(), "myrnn_fast::rnn_cell", [&] {
    const auto& k = kernels<storage_t<scalar_t>>();
    // The step as one pass of the kernels' dot products (no GEMM call, no dispatch: ahead while
    // the step is small) or as ATen GEMMs, then the vectorized nonlinearity.
    const auto step = [&](autotune::Path path) {
      if (path == autotune::Path::kKernels) {
        at::Tensor out = at::detail::empty_cpu({B, H}, x.scalar_type(), /*pin_memory=*/false);  // no dispatch
        const auto xc = x.expect_contiguous(), hc = h.expect_contiguous();
        const auto wi = w_ih.expect_contiguous(), wh = w_hh.expect_contiguous();
        c10::MaybeOwned<at::Tensor> bi, bh;
        if (b_ih) {
          bi = b_ih->expect_contiguous();
          bh = b_hh->expect_contiguous();
        }
        // Rows never interact: each thread of the pool takes its share, when there is enough work.
        for_rows(B, B * H * (I + H), [&](int64_t r0, int64_t r1) {
          k.cell(cptr<scalar_t>(*xc) + r0 * I, cptr<scalar_t>(*hc) + r0 * H, cptr<scalar_t>(*wi),
                 cptr<scalar_t>(*wh), b_ih ? cptr<scalar_t>(*bi) : nullptr, b_ih ? cptr<scalar_t>(*bh) : nullptr,
                 ptr<scalar_t>(out) + r0 * H, r1 - r0, I, H, relu);
        });
        return out;
      }
      at::Tensor out = slow_gemm(x.scalar_type())
                           ? in_float32(cell_preactivation, x.scalar_type(), x, h, w_ih, w_hh, b_ih, b_hh)
                           : cell_preactivation(x, h, w_ih, w_hh, b_ih, b_hh);
      auto* p = ptr<scalar_t>(out);
      for_elements(B * H, [&](int64_t i0, int64_t i1) { k.activate(p + i0, i1 - i0, relu); });
      return out;
    };
    const PathChoice choice = choose_cell(l, x.scalar_type(), k.matrix == Matrix::kBf16Pairs);
    if (choice.path) {
      y = step(*choice.path);
      return;
    }
    at::Tensor ys[2];
    const autotune::Path winner = autotune::measure(
        choice.key,
        [&](autotune::Path path) { return seconds_of([&] { ys[static_cast<int>(path)] = step(path); }); },
        /*pairs=*/4);
    y = ys[static_cast<int>(winner)];
  });
  return y;
}

// ---- instruction sets -----------------------------------------------------------------------

std::vector<std::string> cpu_isas() {
  std::vector<std::string> names;
  for (const KernelTable* t : supported_tables()) names.emplace_back(t->isa);
  return names;
}

std::string isa_in_use() { return table().isa; }

std::string conversions_in_use() { return table().conversions; }

}  // namespace myrnn_fast::cpu

TORCH_LIBRARY_IMPL(myrnn_fast, CPU, m) {
  m.impl("rnn_forward", &myrnn_fast::cpu::rnn_forward);
  m.impl("rnn_backward", &myrnn_fast::cpu::rnn_backward);
  m.impl("rnn_cell", &myrnn_fast::cpu::rnn_cell);
}
