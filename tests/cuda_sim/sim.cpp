// The persistent CUDA kernels' bodies (csrc/kernels/cuda/rnn_cuda_device.cuh) run on the CPU: one std::thread
// per CUDA thread, std::barrier for __syncthreads, the blocks of a grid one after another, and
// shared memory poisoned with NaN so that reading an entry nobody wrote shows in the results.
// tests/test_cuda_sim.py builds this with the host compiler and checks it against torch, so the
// kernels' indexing, packed-sequence bookkeeping and barrier placement are tested without a GPU.
#include "kernels/cuda/rnn_cuda_device.cuh"  // tests/test_cuda_sim.py puts csrc/ on the include path

#include <barrier>
#include <cstdlib>
#include <limits>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

namespace {

using myrnn_fast::Sequence;
namespace device = myrnn_fast::cuda::device;

struct SimBlock {
  int thread_, size_;
  int64_t index_;
  std::barrier<>* barrier_;
  int thread() const { return thread_; }
  int size() const { return size_; }
  int64_t index() const { return index_; }
  void sync() const { barrier_->arrive_and_wait(); }
};

template <typename T, typename Body>
void run_grid(const Sequence& s, int rows, int registers, const Body& body) {
  const int threads = static_cast<int>(device::round_up(s.hidden, 32));
  const size_t count = device::shared_bytes<T>(s.hidden, rows, registers) / sizeof(T);
  for (int64_t block = 0; block < (s.batch + rows - 1) / rows; ++block) {
    std::unique_ptr<T[]> shared(new T[count]);
    for (size_t i = 0; i < count; ++i) shared[i] = std::numeric_limits<T>::quiet_NaN();
    std::barrier<> barrier(threads);
    std::vector<std::thread> pool;
    for (int t = 0; t < threads; ++t)
      pool.emplace_back([&, t] { body(SimBlock{t, threads, block, &barrier}, shared.get()); });
    for (auto& thread : pool) thread.join();
  }
}

template <typename T, int R, int KR>
void forward(const Sequence& s, void* out, const void* h0, const void* w_hh_t, void* h_n, bool relu) {
  run_grid<T>(s, R, KR, [&](const SimBlock& b, T* shared) {
    device::forward<T, R, KR>(b, shared, s, static_cast<T*>(out), static_cast<const T*>(h0),
                              static_cast<const T*>(w_hh_t), static_cast<T*>(h_n), relu);
  });
}

template <typename T, int R, int KR>
void backward(const Sequence& s, void* dz, const void* grad_out, const void* grad_h_n, const void* y,
              const void* w_hh, bool relu) {
  run_grid<T>(s, R, KR, [&](const SimBlock& b, T* shared) {
    device::backward<T, R, KR>(b, shared, s, static_cast<T*>(dz), static_cast<const T*>(grad_out),
                               static_cast<const T*>(grad_h_n), static_cast<const T*>(y),
                               static_cast<const T*>(w_hh), relu);
  });
}

// fn.template operator()<T, R, KR>() for a runtime dtype size, rows per block and register width
// (the variants rnn_cuda_kernels.cu instantiates); 1 for one that does not exist.
template <typename F>
int dispatch(int dtype_bytes, int rows, int registers, const F& fn) {
  auto with_registers = [&]<typename T, int R>() {
    switch (registers) {
      case 0: fn.template operator()<T, R, 0>(); return 0;
      case 32: fn.template operator()<T, R, 32>(); return 0;
      case 64: fn.template operator()<T, R, 64>(); return 0;
      case 128:
        if constexpr (std::is_same_v<T, float>) {
          fn.template operator()<T, R, 128>();
          return 0;
        }
        return 1;
      default: return 1;
    }
  };
  auto with_rows = [&]<typename T>() {
    switch (rows) {
      case 1: return with_registers.template operator()<T, 1>();
      case 2: return with_registers.template operator()<T, 2>();
      case 4: return with_registers.template operator()<T, 4>();
      case 8: return with_registers.template operator()<T, 8>();
      default: return 1;
    }
  };
  if (dtype_bytes == 4) return with_rows.template operator()<float>();
  if (dtype_bytes == 8) return with_rows.template operator()<double>();
  return 1;
}

}  // namespace

extern "C" {

// `batch_sizes`, `offsets`: both null for dense input, else [seq_len] each (host memory), as in
// Sequence. `registers`: 0 for W_hh in shared memory, else the register width (at least hidden).
int sim_forward(int dtype_bytes, int rows, int registers, int64_t seq_len, int64_t batch, int64_t hidden,
                const int64_t* batch_sizes, const int64_t* offsets, void* out, const void* h0, const void* w_hh_t,
                void* h_n, int relu) {
  if (registers != 0 && hidden > registers) return 1;
  const Sequence s{seq_len, batch, hidden, batch_sizes, offsets};
  return dispatch(dtype_bytes, rows, registers,
                  [&]<typename T, int R, int KR>() { forward<T, R, KR>(s, out, h0, w_hh_t, h_n, relu); });
}

int sim_backward(int dtype_bytes, int rows, int registers, int64_t seq_len, int64_t batch, int64_t hidden,
                 const int64_t* batch_sizes, const int64_t* offsets, void* dz, const void* grad_out,
                 const void* grad_h_n, const void* y, const void* w_hh, int relu) {
  if (registers != 0 && hidden > registers) return 1;
  const Sequence s{seq_len, batch, hidden, batch_sizes, offsets};
  return dispatch(dtype_bytes, rows, registers,
                  [&]<typename T, int R, int KR>() { backward<T, R, KR>(s, dz, grad_out, grad_h_n, y, w_hh, relu); });
}

}  // extern "C"
