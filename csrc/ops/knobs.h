// The ops' process-wide settings ("knobs"): one registry, reached from Python as _C.knobs() and
// _C.set_knob(name, value). myrnn_fast/config.py owns what users see of them (documentation,
// environment variables) and pushes values here; the C++ side reads no environment.
//
// Kernels read knobs with the GIL released while another thread may set them, so each value is
// one atomic word: a reader sees the old value or the new one, never a torn one. An op reads each
// knob once per call, so one call runs one configuration throughout.
#pragma once

#include <atomic>
#include <cstdint>
#include <map>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

namespace myrnn_fast::knobs {

using Value = std::variant<std::string, int64_t>;

class Knob {
 public:
  // A string knob: its value is one of `choices` (held as the index).
  Knob(const char* name, std::vector<std::string> choices, std::string_view initial);
  // An integer knob: any value >= 0, or one of `allowed` when given.
  Knob(const char* name, int64_t initial, std::vector<int64_t> allowed = {});
  Knob(const Knob&) = delete;
  Knob& operator=(const Knob&) = delete;

  // The value: an integer knob's number, a string knob's index into its choices.
  int64_t get() const { return value_.load(std::memory_order_relaxed); }
  template <typename Enum>
  Enum as() const {
    return static_cast<Enum>(get());
  }

  const char* name() const { return name_; }
  Value value() const;
  void set(const Value& value);  // c10::ValueError for a value outside the valid ones, listing them

 private:
  const char* name_;
  std::vector<std::string> choices_;  // empty for an integer knob
  std::vector<int64_t> allowed_;      // empty: any integer >= 0
  std::atomic<int64_t> value_;
};

// Every knob's value by name.
std::map<std::string, Value> values();
// Sets one knob; c10::ValueError for an unknown name (listing the knobs) or an invalid value.
void set(std::string_view name, const Value& value);

// ---- the knobs ------------------------------------------------------------------------------

// The instruction set of the CPU kernels: "auto" (the best this CPU supports) or one of
// cpu::cpu_isas(), which are its choices after "auto", in that order.
extern Knob cpu_isa;

// How the CPU recurrence runs: by size (auto), the register-tiled kernels, or a BLAS GEMM per step.
enum class CpuPath : int64_t { kAuto, kTiles, kGemm };  // cpu_path's choices, in order
extern Knob cpu_path;
// Where auto takes the tiles: up to this hidden size, and above it for 2 <= batch <= cpu_tiles_max_batch.
extern Knob cpu_tiles_max_hidden;
extern Knob cpu_tiles_max_batch;
// 1: under cpu_path "auto", the first call of each kind times both paths and keeps the faster
// (ops/autotune.h); 0: the two thresholds above decide.
extern Knob cpu_autotune;
// How a CPU backward forms its weight gradients: by size (auto), in the kernels (no GEMM calls),
// or as ATen GEMMs.
enum class CpuGrads : int64_t { kAuto, kKernels, kGemm };  // cpu_grads' choices, in order
extern Knob cpu_grads;
// Multiply-adds of the gradients up to which auto forms them in the kernels.
extern Knob cpu_grads_kernels_max_work;
// How a CPU RNNCell step runs: measured or by size (auto), the kernels' dot products, or ATen GEMMs.
enum class CpuCell : int64_t { kAuto, kKernels, kGemm };  // cpu_cell's choices, in order
extern Knob cpu_cell;
// How the CPU forward forms its input projection x W_ih^T + b (input size above 1): measured or
// by dtype (auto), the kernels' register tiles, or one ATen GEMM.
enum class CpuProjection : int64_t { kAuto, kKernels, kGemm };  // cpu_projection's choices, in order
extern Knob cpu_projection;
// Multiply-adds below which a CPU call runs on the calling thread rather than ATen's pool.
extern Knob cpu_parallel_min_work;
// Multiply-adds from which _C.rnn_cell_cpu releases the GIL while it computes.
extern Knob cpu_cell_gil_release_min_work;
// The bfloat16 recurrences' products with AVX512-BF16: pairs (vdpbf16ps on the 16-bit state and
// W_hh) or float32 (FMAs on float32 copies of both); auto measures per kind, or float32.
enum class CpuBf16Products : int64_t { kAuto, kPairs, kFloat32 };  // cpu_bf16_products' choices, in order
extern Knob cpu_bf16_products;

#ifdef MYRNN_WITH_CUDA
// How the CUDA recurrence runs: persistent kernels where they fit (auto), with W_hh in registers
// or in shared memory, or a cuBLAS GEMM per step.
enum class CudaPath : int64_t { kAuto, kRegisters, kShared, kGemm };  // cuda_path's choices, in order
extern Knob cuda_path;
// Batch rows per block of the persistent kernels: 1, 2, 4 or 8, or 0 to choose.
extern Knob cuda_rows_per_block;
#endif

}  // namespace myrnn_fast::knobs
