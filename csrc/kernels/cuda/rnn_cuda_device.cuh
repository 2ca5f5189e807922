// Where a time step happens on CUDA: here, in device::forward() and device::backward() (paths
// "registers" and "shared", chosen where they fit). Path "gemm" runs its steps in ops/rnn_layer.h
// instead, one cuBLAS GEMM per step, the loop the CPU ops share.
//
// The bodies of the persistent CUDA kernels (rnn_cuda_kernels.cu wraps them in __global__
// functions). They are written against a small `Block` interface (this thread's index, the
// block's index and size, a barrier) instead of threadIdx / __syncthreads, so that the same code
// also runs on the CPU under tests/cuda_sim/, one std::thread per CUDA thread and std::barrier as
// __syncthreads: the indexing, the packed-sequence bookkeeping and the barrier placement are
// tested on every machine, not only where a GPU is.
//
// The algorithm. cuDNN's persistent RNN spreads W_hh over the whole GPU and pays a grid-wide
// barrier every step. Here each block holds all of W_hh and runs the whole sequence for its own R
// batch rows; rows never interact, so the only synchronization left is one block barrier per
// step. Thread j owns hidden unit j of the block's rows and needs column j of the matrix: in its
// own registers when H <= 128 (float32; 64 in float64), loaded once for the whole sequence, so a
// step reads nothing but the rows' previous states (as broadcasts); otherwise from shared memory
// (consecutive threads, consecutive words: no bank conflicts). Four partial sums per row keep the
// multiply-adds from waiting on each other. The step's input projection (one GEMM for all steps,
// done by the caller) is read a step ahead, so its latency hides behind the previous step.
#pragma once

#include "kernels/sequence.h"

#include <cstddef>
#include <cstdint>
#include <type_traits>

#if defined(__CUDACC__)
#define MYRNN_DEVICE __device__ __forceinline__
#define MYRNN_UNROLL _Pragma("unroll")
#define MYRNN_UNROLL_2 _Pragma("unroll 2")
#else
#include <cmath>
#define MYRNN_DEVICE inline
#define MYRNN_UNROLL
#define MYRNN_UNROLL_2
#endif

namespace myrnn_fast::cuda {

namespace device {

MYRNN_HOST_DEVICE constexpr int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// Where a block keeps the step matrix: `registers` = 0 puts it in shared memory as [K][H] (K = H
// rounded up to 4, rows k >= H zero); registers = KR (32, 64 or 128, at least H) gives each thread
// its own column in KR registers (K = KR, entries k >= H zero) and leaves shared memory to the
// state. Either way two [R][K] state buffers follow (read one step, written the next; entries
// k >= H stay zero).
template <typename T>
MYRNN_HOST_DEVICE constexpr int64_t state_width(int64_t hidden, int registers) {
  return registers > 0 ? registers : round_up(hidden, 4);
}

template <typename T>
MYRNN_HOST_DEVICE constexpr size_t shared_bytes(int64_t hidden, int rows, int registers) {
  const int64_t k = state_width<T>(hidden, registers);
  return static_cast<size_t>((registers > 0 ? 0 : k * hidden) + 2 * rows * k) * sizeof(T);
}

// Same conventions as the CPU kernels: relu keeps NaN (and -0), its derivative is 0 at y <= 0.
template <typename T>
MYRNN_DEVICE T activation(T z, bool relu) {
  if (relu) return z < T(0) ? T(0) : z;
#if defined(__CUDACC__)
  if constexpr (std::is_same_v<T, float>)
    return tanhf(z);
  else
    return tanh(z);
#else
  return std::tanh(z);
#endif
}

template <typename T>
MYRNN_DEVICE T derivative(T y, bool relu) {
  if (relu) return y <= T(0) ? T(0) : T(1);
  return T(1) - y * y;
}

template <typename T>
MYRNN_DEVICE T multiply_add(T a, T b, T c) {
#if defined(__CUDACC__)
  return fma(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}

// Four consecutive values from 16-byte-aligned shared memory, as one or two vector loads.
template <typename T>
MYRNN_DEVICE void load4(const T* p, T (&v)[4]) {
#if defined(__CUDACC__)
  if constexpr (std::is_same_v<T, float>) {
    const float4 a = *reinterpret_cast<const float4*>(p);
    v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w;
    return;
  } else {
    const double2 a = *reinterpret_cast<const double2*>(p), b = *reinterpret_cast<const double2*>(p + 2);
    v[0] = a.x, v[1] = a.y, v[2] = b.x, v[3] = b.y;
    return;
  }
#else
  for (int q = 0; q < 4; ++q) v[q] = p[q];
#endif
}

// Column j of the step matrix ([k][j] = matrix[k * H + j]) as the dot products read it.
template <typename T, int KR>
struct Column {  // in this thread's registers: every index is a constant once the loops unroll
  T v[KR];
  MYRNN_DEVICE void four(int64_t k, T (&w)[4]) const {
MYRNN_UNROLL
    for (int q = 0; q < 4; ++q) w[q] = v[k + q];
  }
};

template <typename T>
struct Column<T, 0> {  // in shared memory, [K][H]
  const T* w;
  int64_t H;
  int j;
  MYRNN_DEVICE void four(int64_t k, T (&v)[4]) const {
MYRNN_UNROLL
    for (int q = 0; q < 4; ++q) v[q] = w[(k + q) * H + j];
  }
};

// Loads the matrix where the block keeps it and zeroes both state buffers; returns thread j's
// view of its column. Followed by a barrier before anything reads shared memory.
template <typename T, int R, int KR, typename Block>
MYRNN_DEVICE Column<T, KR> load_matrix(const Block& b, T* shared, const T* __restrict__ matrix, int64_t H, int j,
                                       T*& state) {
  const int64_t K = state_width<T>(H, KR);
  Column<T, KR> column;
  if constexpr (KR > 0) {
MYRNN_UNROLL
    for (int k = 0; k < KR; ++k) column.v[k] = k < H && j < H ? matrix[k * H + j] : T(0);
    state = shared;
  } else {
    for (int64_t i = b.thread(); i < K * H; i += b.size()) shared[i] = i < H * H ? matrix[i] : T(0);
    column = {shared, H, j};
    state = shared + K * H;
  }
  for (int64_t i = b.thread(); i < 2 * R * K; i += b.size()) state[i] = T(0);
  return column;
}

// v[r] = buffer[row0 + r][j] at `step` for the block's rows active there, zero for the others and
// for a null buffer (an absent gradient).
template <typename T, int R>
MYRNN_DEVICE void load_rows(const T* __restrict__ buffer, const Step& step, int64_t row0, int64_t H, int j,
                            T (&v)[R]) {
MYRNN_UNROLL
  for (int r = 0; r < R; ++r)
    v[r] = buffer && row0 + r < step.batch_size ? buffer[(step.offset + row0 + r) * H + j] : T(0);
}

// out[r] = sum_k state[r][k] * column[k]: four partial sums per row, added at the end. A column in
// registers has a compile-time length and unrolls completely.
template <typename T, int R, int KR>
MYRNN_DEVICE void dot_column(const Column<T, KR>& column, const T* __restrict__ state, int64_t K, T (&out)[R]) {
  T acc[R][4];
MYRNN_UNROLL
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = acc[r][2] = acc[r][3] = T(0);
  const auto step = [&](int64_t k) {
    T wk[4];
    column.four(k, wk);
MYRNN_UNROLL
    for (int r = 0; r < R; ++r) {
      T hv[4];
      load4(state + r * K + k, hv);
MYRNN_UNROLL
      for (int q = 0; q < 4; ++q) acc[r][q] = multiply_add(hv[q], wk[q], acc[r][q]);
    }
  };
  if constexpr (KR > 0) {
MYRNN_UNROLL
    for (int k = 0; k < KR; k += 4) step(k);
  } else {
MYRNN_UNROLL_2
    for (int64_t k = 0; k < K; k += 4) step(k);
  }
MYRNN_UNROLL
  for (int r = 0; r < R; ++r) out[r] = (acc[r][0] + acc[r][1]) + (acc[r][2] + acc[r][3]);
}

// The forward recurrence of rows [R * block, R * block + R); the arguments are persistent_forward's
// (rnn_cuda_kernels.h): `out` holds the input projections on entry and h_t on exit.
template <typename T, int R, int KR, typename Block>
MYRNN_DEVICE void forward(const Block& b, T* shared, const Sequence& s, T* __restrict__ out, const T* __restrict__ h0,
                          const T* __restrict__ w_hh_t, T* __restrict__ h_n, bool relu) {
  const int64_t H = s.hidden, K = state_width<T>(H, KR);
  const int j = b.thread();
  const int64_t row0 = b.index() * int64_t{R};
  T* state;
  const Column<T, KR> column = load_matrix<T, R, KR>(b, shared, w_hh_t, H, j, state);
  b.sync();  // the zero fill of `state` before h0 lands in it
  if (j < H)
    for (int r = 0; r < R; ++r)
      if (row0 + r < s.batch) state[r * K + j] = h0[(row0 + r) * H + j];
  b.sync();

  // The step's input projection is read one step ahead, so its global-memory latency overlaps
  // the previous step's barrier and dot product instead of adding to the step.
  T pre[R];
  Step step = s.seq_len > 0 ? step_at(s, 0) : Step{};
  if (j < H) load_rows<T, R>(out, step, row0, H, j, pre);
  int current = 0;
  for (int64_t t = 0; t < s.seq_len; ++t) {
    if (row0 >= step.batch_size) break;  // the same for the whole block; sizes never grow again
    const T* h = state + current * R * K;
    T* h_next = state + (current ^ 1) * R * K;
    const Step following = t + 1 < s.seq_len ? step_at(s, t + 1) : Step{};
    if (j < H) {
      T dot[R];
      dot_column<T, R, KR>(column, h, K, dot);
MYRNN_UNROLL
      for (int r = 0; r < R; ++r) {
        const int64_t row = row0 + r;
        if (row >= step.batch_size) continue;
        const T y = activation(pre[r] + dot[r], relu);
        out[(step.offset + row) * H + j] = y;
        h_next[r * K + j] = y;
        if (row >= step.next_batch_size) h_n[row * H + j] = y;  // this row's sequence ends here
      }
      load_rows<T, R>(out, following, row0, H, j, pre);
    }
    b.sync();  // h_next complete before anyone reads it; h no longer read before it is rewritten
    current ^= 1;
    step = following;
  }
}

// The reverse recurrence of the same rows; the arguments are persistent_backward's: dz_t =
// (grad_out_t + dz_{t+1} W_hh) * act'(y_t), a row's last step taking grad_h_n instead of the product.
template <typename T, int R, int KR, typename Block>
MYRNN_DEVICE void backward(const Block& b, T* shared, const Sequence& s, T* __restrict__ dz,
                           const T* __restrict__ grad_out, const T* __restrict__ grad_h_n, const T* __restrict__ y,
                           const T* __restrict__ w_hh, bool relu) {
  const int64_t H = s.hidden, K = state_width<T>(H, KR);
  const int j = b.thread();
  const int64_t row0 = b.index() * int64_t{R};
  T* state;  // dz_{t+1} of the block's rows, then dz_t
  const Column<T, KR> column = load_matrix<T, R, KR>(b, shared, w_hh, H, j, state);
  b.sync();

  // grad_out and y of a step are read one step ahead (in reverse), like the forward's projection.
  T go[R], y_t[R];
  Step step = s.seq_len > 0 ? step_at(s, s.seq_len - 1) : Step{};
  if (j < H) {
    load_rows<T, R>(grad_out, step, row0, H, j, go);
    load_rows<T, R>(y, step, row0, H, j, y_t);
  }
  int current = 0;
  for (int64_t t = s.seq_len - 1; t >= 0; --t) {
    const Step preceding = t > 0 ? step_at(s, t - 1) : Step{};
    if (row0 < step.batch_size) {  // the same for the whole block; its rows may start later
      const T* dz_next = state + current * R * K;
      T* dz_now = state + (current ^ 1) * R * K;
      if (j < H) {
        T dot[R];
        dot_column<T, R, KR>(column, dz_next, K, dot);
MYRNN_UNROLL
        for (int r = 0; r < R; ++r) {
          const int64_t row = row0 + r;
          if (row >= step.batch_size) continue;
          // Rows that go on to step t+1 get dz_{t+1} W_hh; the others start here from grad_h_n.
          const T carried = row < step.next_batch_size ? dot[r] : grad_h_n ? grad_h_n[row * H + j] : T(0);
          const T d = (go[r] + carried) * derivative(y_t[r], relu);
          dz[(step.offset + row) * H + j] = d;
          dz_now[r * K + j] = d;
        }
      }
      b.sync();
      current ^= 1;
    }
    if (j < H) {
      load_rows<T, R>(grad_out, preceding, row0, H, j, go);
      load_rows<T, R>(y, preceding, row0, H, j, y_t);
    }
    step = preceding;
  }
}

}  // namespace device
}  // namespace myrnn_fast::cuda
