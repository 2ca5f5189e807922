// The CPU recurrence kernels of path "tiles", compiled once per instruction set (see
// CMakeLists.txt) and chosen at run time (knob cpu_isa). Plain C++ over raw row-major buffers:
// shapes, dtypes, allocation, GEMMs and the thread pool belong to ops/rnn_cpu.cpp, which validates
// everything before a pointer reaches here. Shapes below: N = rows (all steps' packed rows),
// B = batch, I = input size, H = hidden; every buffer is contiguous and row-major.
#pragma once

#include "kernels/sequence.h"

#include <cstdint>

namespace myrnn_fast::cpu {

// 16-bit storage types, as the kernels see them: the bits of a bfloat16 or an IEEE half value
// (the layout of c10::BFloat16 and c10::Half). The kernels read them, compute in float and
// round each stored value to nearest even; nothing is widened into a float32 copy first.
struct bf16 {
  uint16_t bits;
};
struct f16 {
  uint16_t bits;
};

// What grads accumulates in: double for float64, float for the others.
template <typename T> struct Accumulator { using type = float; };
template <> struct Accumulator<double> { using type = double; };
// The number of Accumulator values grads fills: grad W_hh, grad W_ih and grad b.
inline int64_t grads_size(int64_t hidden, int64_t input) { return hidden * hidden + input * hidden + hidden; }

// The recurrent matrix m (forward: W_hh^T, backward: W_hh) as a kernel table takes it:
//   kStorage    row-major [H][H] in the storage type T
//   kFloat      row-major [H][H] in float32 (16-bit kernels without pairwise instructions)
//   kBf16Pairs  bfloat16 with rows k and k + 1 interleaved, [ceil(H/2)][H][2] (element
//               [k/2][j][k%2] is m[k][j]), a zero row after the last when H is odd: what
//               AVX512-BF16's pairwise multiply-add reads
enum class Matrix { kStorage, kFloat, kBf16Pairs };

// Univariate input (I = 1) whose projection p = x w + b the forward forms in its register tiles,
// as their start: the projection pass over [N, H] and the recurrence's reads of it cost more than
// the one multiply-add per element they stand for (a quarter of the forward at (176, 25, 1, 32)).
// The values are project_univariate's, rounded to T where T is 16-bit.
template <typename T>
struct Univariate {
  using C = typename Accumulator<T>::type;
  const T* x = nullptr;     // [N] the input
  const C* w = nullptr;     // [H] W_ih's only column, in the compute type
  const C* bias = nullptr;  // [H] b_ih + b_hh in that type, or null for none
};

// T is the storage type of every buffer but m; float16 and bfloat16 accumulate in float registers.
template <typename T>
struct Kernels {
  // The forward recurrence h_t = act(p_t + h_{t-1} W_hh^T) of batch rows [r0, r1), every step.
  //   s       the sequence (host arrays when packed)
  //   out     [N, H] in: the input projections p = x W_ih^T + b, unless `u` forms them; out: h_t.
  //           Read and overwritten in place: step t reads step t-1's rows of `out` after they
  //           were written
  //   u       univariate input whose projections the tiles form themselves (out is then only
  //           written), or null
  //   h0      [B, H] the initial state
  //   w_hh_t  [H, H] W_hh transposed ([k][j] = W_hh[j][k]), typed and laid out as `matrix` says
  //   h_n     [B, H] out: each row's state after its last step; must not alias out or h0
  //   relu    act = relu if true, else tanh
  //   r0, r1  the rows this call runs; calls on disjoint ranges may run at the same time
  void (*forward)(const Sequence& s, T* out, const Univariate<T>* u, const T* h0, const void* w_hh_t, T* h_n,
                  bool relu, int64_t r0, int64_t r1);
  // The reverse recurrence dz_t = (grad_out_t + dz_{t+1} W_hh) * act'(y_t) of rows [r0, r1), where a
  // row's last step takes grad_h_n instead of the product.
  //   s         the sequence, as for forward
  //   dz        [N, H] out: the gradient at the pre-activations; must not alias the inputs
  //   grad_out  [N, H] the gradient of out, or null for zeros
  //   grad_h_n  [B, H] the gradient of h_n, or null for zeros
  //   out       [N, H] the forward's output y = act(z)
  //   w_hh      [H, H] W_hh itself (not transposed), typed and laid out as `matrix` says
  //   relu, r0, r1  as for forward
  void (*backward)(const Sequence& s, T* dz, const T* grad_out, const T* grad_h_n, const T* out, const void* w_hh,
                   bool relu, int64_t r0, int64_t r1);
  // The input projection of univariate input (I = 1) in one pass: out[n, :] = x[n] w + b, where
  // the tiles' forward does not form it itself (Univariate: the same values). A GEMM with inner
  // dimension 1 runs far below BLAS speed and, with a bias, writes the output twice; this is the
  // same single product and sum per element.
  //   out   [rows, hidden] out
  //   u     the input [rows], W_ih's column and the bias sum, as the forward takes them
  void (*project_univariate)(T* out, const Univariate<T>& u, int64_t rows, int64_t hidden);
  // The input projection of any input size without a GEMM call: out = x W_ih^T + bias, in the
  // register tiles of the gradients' grad x (path "kernels" of knob cpu_projection).
  //   out    [rows, hidden] out
  //   x      [rows, input]
  //   w_t    [input, hidden]: W_ih transposed, in Accumulator<T>'s type (float32 for 16-bit storage)
  //   bias   [hidden] b_ih + b_hh in that type, or null for none
  void (*project)(T* out, const T* x, const typename Accumulator<T>::type* w_t,
                  const typename Accumulator<T>::type* bias, int64_t rows, int64_t input, int64_t hidden);
  // The elementwise pieces of path "gemm", in place over n values:
  //   activate:  y = act(y)
  //   mul_dact:  g *= act'(z), where y [n] holds act(z); y must not alias g
  void (*activate)(T* y, int64_t n, bool relu);
  void (*mul_dact)(T* g, const T* y, int64_t n, bool relu);
  // One RNNCell step for small sizes, without any GEMM call: y = act(x W_ih^T + h W_hh^T + b_ih + b_hh).
  //   x [batch, input], h [batch, hidden], w_ih [hidden, input], w_hh [hidden, hidden]
  //   b_ih, b_hh  [hidden] each, or both null
  //   y  [batch, hidden] out; must not alias x or h
  void (*cell)(const T* x, const T* h, const T* w_ih, const T* w_hh, const T* b_ih, const T* b_hh, T* y,
               int64_t batch, int64_t input, int64_t hidden, bool relu);
  // The weight gradients of rows [r0, r1) after backward filled dz, without any GEMM call: for
  // small layers, where each ATen GEMM's fixed cost exceeds its work (path "fused" of the
  // gradients). `acc` holds Accumulator<T> values, added to (zero it first):
  //   [H, H] grad W_hh transposed ([k][j] = sum_n dz[n][j] h_prev[n][k]), then
  //   [I, H] grad W_ih transposed, then [H] grad b
  // so threads on disjoint row ranges each fill their own and grads_finish sums them.
  //   input    I;  x [N, I], h0 [B, H], y [N, H] the forward's output, w_ih [H, I], w_hh [H, H]
  //   grad_x   [N, I] out for these rows (dz W_ih), or null for none
  //   grad_h0  [B, H] out for these rows (dz_0 W_hh), or null for none; every row is active at step 0
  void (*grads)(const Sequence& s, int64_t input, const T* dz, const T* x, const T* h0, const T* y, const T* w_ih,
                const T* w_hh, void* acc, T* grad_x, T* grad_h0, int64_t r0, int64_t r1);
  // Sums `parts` accumulators of grads (each `stride` values after the one before) and writes
  // grad_w_hh [H, H], grad_w_ih [H, I] and grad_b [H], each value rounded once to T.
  void (*grads_finish)(const void* acc, int64_t parts, int64_t stride, int64_t hidden, int64_t input, T* grad_w_hh,
                       T* grad_w_ih, T* grad_b);
  // The type and layout of forward's w_hh_t and backward's w_hh (see Matrix).
  Matrix matrix;
};

struct KernelTable {
  const char* isa;
  Kernels<float> f32;
  Kernels<double> f64;
  Kernels<bf16> b16;
  // bfloat16 recurrences whose products are FMAs on float32 copies of the state and of W_hh, with
  // the same conversions as b16 (the rest is b16's). Where b16 multiplies pairs (AVX512-BF16's
  // vdpbf16ps), the op chooses between the two (ops/rnn_cpu.cpp, recurrence_kernels): one row's
  // step is one dependent chain, and vdpbf16ps has about twice an FMA's latency; on Sapphire
  // Rapids it also issues at half an FMA's rate. Elsewhere these are b16.
  Kernels<bf16> b16_float;
  Kernels<f16> h16;
  // How this table converts 16-bit storage to float and back, for `myrnn-fast info`.
  const char* conversions;
};

const KernelTable& kernels_baseline();
#ifdef MYRNN_HAVE_AVX2
const KernelTable& kernels_avx2();
#endif
#ifdef MYRNN_HAVE_AVX512
const KernelTable& kernels_avx512();
#endif
#ifdef MYRNN_HAVE_AVX512BF16
const KernelTable& kernels_avx512bf16();
#endif

}  // namespace myrnn_fast::cpu
