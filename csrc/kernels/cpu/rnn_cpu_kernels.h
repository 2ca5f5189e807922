// The CPU recurrence kernels, compiled once per instruction set (see CMakeLists.txt) and chosen
// at load time. Plain C++ over raw row-major buffers: shapes, dtypes, allocation, GEMMs and the
// thread pool belong to rnn_cpu.cpp, which validates everything before a pointer reaches here.
#pragma once

#include <cstdint>

namespace myrnn_fast::cpu {

// A packed sequence as the kernels see it: step t holds rows 0 .. batch[t]-1 (non-increasing),
// stored from packed row offset[t] on; every buffer is [rows, hidden] with row stride `hidden`.
struct Steps {
  int64_t count;
  const int64_t* batch;
  const int64_t* offset;
  int64_t hidden;
};

template <typename T>
struct Kernels {
  // Rows [r0, r1) of the forward recurrence. `out` holds x W_ih^T + b on entry and h_t on exit;
  // `w_hh_t` is W_hh transposed ([k][j] = W_hh[j][k]). Writes each row's last state to h_n.
  void (*forward)(const Steps& s, T* out, const T* h0, const T* w_hh_t, T* h_n, bool relu,
                  int64_t r0, int64_t r1);
  // Rows [r0, r1) of the reverse recurrence: dz_t = (grad_out_t + dz_{t+1} W_hh) * act'(y_t),
  // where a row's last step takes grad_h_n instead of the product. Null grads count as zeros.
  void (*backward)(const Steps& s, T* dz, const T* grad_out, const T* grad_h_n, const T* out,
                   const T* w_hh, bool relu, int64_t r0, int64_t r1);
  // The input projection of univariate input (I = 1) in one pass: out[n, :] = x[n] w + b (b may
  // be null). A GEMM with inner dimension 1 runs far below BLAS speed and, with a bias, writes
  // the output twice; this is the same single product and sum per element.
  void (*project_univariate)(T* out, const T* x, const T* w, const T* b, int64_t rows, int64_t hidden);
  // Elementwise pieces of the GEMM path: y = act(y), and g *= act'(y) given y = act(z).
  void (*activate)(T* y, int64_t n, bool relu);
  void (*mul_dact)(T* g, const T* y, int64_t n, bool relu);
  // One RNNCell step for small sizes, without any GEMM call: y = act(x W_ih^T + h W_hh^T + b).
  void (*cell)(const T* x, const T* h, const T* w_ih, const T* w_hh, const T* b_ih,
               const T* b_hh, T* y, int64_t batch, int64_t input, int64_t hidden, bool relu);
};

struct KernelTable {
  const char* isa;
  Kernels<float> f32;
  Kernels<double> f64;
};

const KernelTable& kernels_baseline();
#ifdef MYRNN_HAVE_AVX2
const KernelTable& kernels_avx2();
#endif
#ifdef MYRNN_HAVE_AVX512
const KernelTable& kernels_avx512();
#endif

}  // namespace myrnn_fast::cpu
