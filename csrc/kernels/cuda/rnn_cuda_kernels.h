// The CUDA recurrence kernels (rnn_cuda_kernels.cu). Plain CUDA over raw row-major buffers, no
// torch headers: shapes, dtypes, allocation, GEMMs, streams and the device guard belong to
// ops/rnn_cuda.cpp, which validates everything before a pointer reaches here. Every launcher runs
// on the stream it is given and returns the launch's error instead of throwing. Shapes below:
// N = rows (all steps' packed rows), B = batch, H = hidden; every buffer is contiguous, row-major
// and in device memory.
#pragma once

#include "kernels/sequence.h"

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace myrnn_fast::cuda {

// How the persistent kernels would run a layer on the current device: each thread block keeps
// W_hh in shared memory and `rows_per_block` batch rows' state for the whole sequence, one
// launch per sequence. Batch rows never interact, so blocks never wait for each other: no grid
// barrier, and a grid larger than the GPU is still correct (only slower), which is why `fits`
// also asks that the grid runs in one wave.
struct Plan {
  bool fits = false;
  int rows_per_block = 0, registers = 0, threads = 0, blocks = 0;
  size_t shared_bytes = 0;
};

// The register width (32, 64 or 128 for float32; 32 or 64 for float64) that holds a W_hh column
// of this hidden size in each thread's registers, or 0 where only shared memory can hold it.
template <typename T>
int register_columns(int64_t hidden);

// `registers`: 0 keeps W_hh in shared memory, register_columns<T>(hidden) in registers.
// rows_per_block 1, 2, 4 or 8 forces that many (tests); 0 chooses. any_waves accepts a grid that
// needs several waves (correct, only slower) rather than reporting that the kernels do not fit.
template <typename T>
Plan persistent_plan(int64_t batch, int64_t hidden, bool backward, int rows_per_block, bool any_waves, int registers);

// The forward recurrence h_t = act(p_t + h_{t-1} W_hh^T), every step, in one launch.
//   plan    from persistent_plan, with fits set
//   s       the sequence; packed, its arrays are in device memory
//   out     [N, H] in: the input projections p = x W_ih^T + b; out: h_t. Read and overwritten in place
//   h0      [B, H] the initial state
//   w_hh_t  [H, H] W_hh transposed ([k][j] = W_hh[j][k])
//   h_n     [B, H] out: each row's state after its last step; must not alias out or h0
//   relu    act = relu if true, else tanh
template <typename T>
cudaError_t persistent_forward(const Plan& plan, const Sequence& s, T* out, const T* h0, const T* w_hh_t, T* h_n,
                               bool relu, cudaStream_t stream);

// The reverse recurrence dz_t = (grad_out_t + dz_{t+1} W_hh) * act'(y_t), every step, in one launch;
// a row's last step takes grad_h_n instead of the product.
//   plan, s   as for persistent_forward
//   dz        [N, H] out: the gradient at the pre-activations; must not alias the inputs
//   grad_out  [N, H] the gradient of the output, or null for zeros
//   grad_h_n  [B, H] the gradient of h_n, or null for zeros
//   y         [N, H] the forward's output
//   w_hh      [H, H] W_hh itself (not transposed)
template <typename T>
cudaError_t persistent_backward(const Plan& plan, const Sequence& s, T* dz, const T* grad_out, const T* grad_h_n,
                                const T* y, const T* w_hh, bool relu, cudaStream_t stream);

// The elementwise pieces of path "gemm", in place over n values: y = act(y), and g *= act'(z) where
// y [n] holds act(z) (y must not alias g).
template <typename T>
cudaError_t activate(T* y, int64_t n, bool relu, cudaStream_t stream);
template <typename T>
cudaError_t mul_dact(T* g, const T* y, int64_t n, bool relu, cudaStream_t stream);

}  // namespace myrnn_fast::cuda
