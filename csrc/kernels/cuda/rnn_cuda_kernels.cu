// CUDA recurrence kernels: the persistent forward and backward (their bodies, and why they look
// the way they do, are in rnn_cuda_device.cuh), their launch plan, and the elementwise kernels of
// the per-step GEMM path.

#include "kernels/cuda/rnn_cuda_kernels.h"

#include "kernels/cuda/rnn_cuda_device.cuh"

#include <algorithm>
#include <limits>
#include <map>
#include <mutex>
#include <tuple>
#include <type_traits>

namespace myrnn_fast::cuda {
namespace {

using device::shared_bytes;

constexpr int kMaxRowsPerBlock = 8;
// One thread per hidden unit. Shared memory caps H near 238 (float32) anyway; a bound of 256
// threads leaves each thread the registers for 8 rows x 4 partial sums in float64.
constexpr int kMaxThreads = 256;

// The CUDA side of the kernels' Block interface.
struct CudaBlock {
  __device__ int thread() const { return threadIdx.x; }
  __device__ int size() const { return blockDim.x; }
  __device__ int64_t index() const { return blockIdx.x; }
  __device__ void sync() const { __syncthreads(); }
};

template <typename T>
__device__ T* shared_memory() {
  extern __shared__ __align__(16) unsigned char shared[];
  return reinterpret_cast<T*>(shared);
}

template <typename T, int R, int KR>
__global__ void __launch_bounds__(kMaxThreads) forward_kernel(Sequence s, T* __restrict__ out, const T* __restrict__ h0,
                                                              const T* __restrict__ w_hh_t, T* __restrict__ h_n,
                                                              bool relu) {
  device::forward<T, R, KR>(CudaBlock{}, shared_memory<T>(), s, out, h0, w_hh_t, h_n, relu);
}

template <typename T, int R, int KR>
__global__ void __launch_bounds__(kMaxThreads) backward_kernel(Sequence s, T* __restrict__ dz,
                                                               const T* __restrict__ grad_out,
                                                               const T* __restrict__ grad_h_n, const T* __restrict__ y,
                                                               const T* __restrict__ w_hh, bool relu) {
  device::backward<T, R, KR>(CudaBlock{}, shared_memory<T>(), s, dz, grad_out, grad_h_n, y, w_hh, relu);
}

template <int N>
using Int = std::integral_constant<int, N>;

// fn(Int<R>{}, Int<KR>{}) for a runtime (rows per block, register width): the kernel variants
// that exist. float64 columns stop at 64 registers (128 would take 256 of the 255 a thread has).
template <typename T, typename F>
auto with_variant(int rows, int registers, const F& fn) {
  const auto by_rows = [&](auto kr) {
    switch (rows) {
      case 1: return fn(Int<1>{}, kr);
      case 2: return fn(Int<2>{}, kr);
      case 4: return fn(Int<4>{}, kr);
      default: return fn(Int<8>{}, kr);
    }
  };
  if (registers == 32) return by_rows(Int<32>{});
  if (registers == 64) return by_rows(Int<64>{});
  if constexpr (std::is_same_v<T, float>)
    if (registers == 128) return by_rows(Int<128>{});
  return by_rows(Int<0>{});
}

template <typename T>
void* kernel_for(int rows, int registers, bool backward) {
  return with_variant<T>(rows, registers, [&](auto r, auto kr) {
    constexpr int R = decltype(r)::value, KR = decltype(kr)::value;
    return backward ? reinterpret_cast<void*>(&backward_kernel<T, R, KR>)
                    : reinterpret_cast<void*>(&forward_kernel<T, R, KR>);
  });
}

// Resident blocks per SM of one kernel at one shared-memory size, asked of the occupancy
// calculator once per device and shape. It also lifts the kernel's dynamic shared-memory limit
// to the device's maximum (the same value for every caller, so threads cannot race on it).
int blocks_per_sm(void* kernel, int device, int threads, size_t bytes, int max_bytes) {
  static std::mutex mutex;
  static std::map<std::tuple<void*, int, int, size_t>, int> known;
  const auto key = std::make_tuple(kernel, device, threads, bytes);
  std::lock_guard<std::mutex> lock(mutex);
  if (auto it = known.find(key); it != known.end()) return it->second;
  int blocks = 0;  // a failed query counts as "does not fit", for good: that shape takes the GEMM path
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, max_bytes) != cudaSuccess ||
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, threads, bytes) != cudaSuccess) {
    cudaGetLastError();  // not sticky: clear it so the caller's next launch check does not see it
    blocks = 0;
  }
  known.emplace(key, blocks);
  return blocks;
}

template <typename Kernel, typename... Args>
cudaError_t launch(const Plan& p, Kernel kernel, cudaStream_t stream, Args... args) {
  kernel<<<p.blocks, p.threads, p.shared_bytes, stream>>>(args...);
  return cudaGetLastError();
}

template <typename T>
__global__ void activate_kernel(T* y, int64_t n, bool relu) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    y[i] = device::activation(y[i], relu);
}

template <typename T>
__global__ void mul_dact_kernel(T* g, const T* y, int64_t n, bool relu) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    g[i] *= device::derivative(y[i], relu);
}

unsigned elementwise_blocks(int64_t n) { return static_cast<unsigned>(std::min<int64_t>((n + 255) / 256, 65535)); }

}  // namespace

template <typename T>
int register_columns(int64_t hidden) {
  if (hidden <= 0) return 0;
  if (hidden <= 32) return 32;
  if (hidden <= 64) return 64;
  if (std::is_same_v<T, float> && hidden <= 128) return 128;
  return 0;
}

template <typename T>
Plan persistent_plan(int64_t batch, int64_t hidden, bool backward, int rows_per_block, bool any_waves, int registers) {
  Plan p;
  if (batch <= 0 || hidden <= 0 || hidden > kMaxThreads) return p;
  if (registers != 0 && (registers != register_columns<T>(registers) || hidden > registers)) return p;
  int device = 0, sms = 0, max_bytes = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&max_bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess) {
    cudaGetLastError();
    return p;
  }
  const int threads = static_cast<int>(device::round_up(hidden, 32));
  const int first = rows_per_block > 0 ? rows_per_block : 1, last = rows_per_block > 0 ? rows_per_block : kMaxRowsPerBlock;
  // The fewest rows per block that still run the whole batch in one wave: more blocks, each
  // with a shorter dot product per step, is the faster trade as long as they all fit at once.
  // Failing that (any_waves), the most rows per block that fit: the fewest waves.
  for (int rows = first; rows <= last; rows *= 2) {
    const size_t bytes = shared_bytes<T>(hidden, rows, registers);
    if (bytes > static_cast<size_t>(max_bytes)) break;
    const int64_t blocks = (batch + rows - 1) / rows;
    if (blocks > std::numeric_limits<int>::max()) continue;
    const int resident = blocks_per_sm(kernel_for<T>(rows, registers, backward), device, threads, bytes, max_bytes);
    if (resident == 0) break;
    const bool one_wave = blocks <= static_cast<int64_t>(resident) * sms;
    if (!one_wave && !any_waves) continue;
    p.fits = true;
    p.rows_per_block = rows;
    p.registers = registers;
    p.threads = threads;
    p.blocks = static_cast<int>(blocks);
    p.shared_bytes = bytes;
    if (one_wave) break;
  }
  return p;
}

template <typename T>
cudaError_t persistent_forward(const Plan& p, const Sequence& s, T* out, const T* h0, const T* w_hh_t, T* h_n,
                               bool relu, cudaStream_t stream) {
  if (!p.fits) return cudaErrorInvalidValue;
  return with_variant<T>(p.rows_per_block, p.registers, [&](auto r, auto kr) {
    return launch(p, forward_kernel<T, decltype(r)::value, decltype(kr)::value>, stream, s, out, h0, w_hh_t, h_n,
                  relu);
  });
}

template <typename T>
cudaError_t persistent_backward(const Plan& p, const Sequence& s, T* dz, const T* grad_out, const T* grad_h_n,
                                const T* y, const T* w_hh, bool relu, cudaStream_t stream) {
  if (!p.fits) return cudaErrorInvalidValue;
  return with_variant<T>(p.rows_per_block, p.registers, [&](auto r, auto kr) {
    return launch(p, backward_kernel<T, decltype(r)::value, decltype(kr)::value>, stream, s, dz, grad_out, grad_h_n,
                  y, w_hh, relu);
  });
}

template <typename T>
cudaError_t activate(T* y, int64_t n, bool relu, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  activate_kernel<T><<<elementwise_blocks(n), 256, 0, stream>>>(y, n, relu);
  return cudaGetLastError();
}

template <typename T>
cudaError_t mul_dact(T* g, const T* y, int64_t n, bool relu, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  mul_dact_kernel<T><<<elementwise_blocks(n), 256, 0, stream>>>(g, y, n, relu);
  return cudaGetLastError();
}

#define MYRNN_INSTANTIATE(T)                                                                                    \
  template int register_columns<T>(int64_t);                                                                    \
  template Plan persistent_plan<T>(int64_t, int64_t, bool, int, bool, int);                                     \
  template cudaError_t persistent_forward<T>(const Plan&, const Sequence&, T*, const T*, const T*, T*, bool,    \
                                             cudaStream_t);                                                     \
  template cudaError_t persistent_backward<T>(const Plan&, const Sequence&, T*, const T*, const T*, const T*,   \
                                              const T*, bool, cudaStream_t);                                    \
  template cudaError_t activate<T>(T*, int64_t, bool, cudaStream_t);                                            \
  template cudaError_t mul_dact<T>(T*, const T*, int64_t, bool, cudaStream_t);
MYRNN_INSTANTIATE(float)
MYRNN_INSTANTIATE(double)
#undef MYRNN_INSTANTIATE

}  // namespace myrnn_fast::cuda
