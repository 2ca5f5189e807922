// The knob registry and every knob's default (see knobs.h). The defaults are the values that
// myrnn_fast/config.py documents; it may push others before the first call.

#include "ops/knobs.h"

#include "ops/rnn_cpu.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <sstream>

namespace myrnn_fast::knobs {

namespace {

template <typename T>
std::string joined(const std::vector<T>& items) {
  std::ostringstream s;
  for (size_t i = 0; i < items.size(); ++i) s << (i ? ", " : "") << items[i];
  return s.str();
}

std::vector<std::string> with_auto(std::vector<std::string> choices) {
  choices.insert(choices.begin(), "auto");
  return choices;
}

}  // namespace

Knob::Knob(const char* name, std::vector<std::string> choices, std::string_view initial)
    : name_(name), choices_(std::move(choices)), value_(0) {
  set(std::string(initial));
}

Knob::Knob(const char* name, int64_t initial, std::vector<int64_t> allowed)
    : name_(name), allowed_(std::move(allowed)), value_(0) {
  set(initial);
}

Value Knob::value() const {
  if (choices_.empty()) return get();
  return choices_[get()];
}

void Knob::set(const Value& value) {
  if (!choices_.empty()) {
    const auto* text = std::get_if<std::string>(&value);
    const auto it = text ? std::find(choices_.begin(), choices_.end(), *text) : choices_.end();
    if (it == choices_.end()) {
      std::ostringstream got;
      std::visit([&](const auto& v) { got << (text ? "'" : "") << v << (text ? "'" : ""); }, value);
      TORCH_CHECK_VALUE(false, "myrnn_fast: knob ", name_, " must be one of ", joined(choices_), "; got ",
                        got.str());
    }
    value_.store(it - choices_.begin());
    return;
  }
  const auto* number = std::get_if<int64_t>(&value);
  const bool valid = number && (allowed_.empty() ? *number >= 0
                                                 : std::find(allowed_.begin(), allowed_.end(), *number) !=
                                                       allowed_.end());
  if (!valid) {
    const std::string expected = allowed_.empty() ? "an integer >= 0" : "one of " + joined(allowed_);
    const std::string got = number ? std::to_string(*number) : "'" + std::get<std::string>(value) + "'";
    TORCH_CHECK_VALUE(false, "myrnn_fast: knob ", name_, " must be ", expected, "; got ", got);
  }
  value_.store(*number);
}

// ---- the knobs ------------------------------------------------------------------------------

Knob cpu_isa{"cpu_isa", with_auto(cpu::cpu_isas()), "auto"};
Knob cpu_path{"cpu_path", {"auto", "tiles", "gemm"}, "auto"};
// The tiles split the batch's rows over ATen's threads and stream W_hh from cache once per block
// of rows and step, with no call per step; a GEMM per step pays a call per step but splits W_hh
// itself over the threads. While W_hh fits the caches (H <= 512: 1 MB in float32) the tiles win at
// any batch. Above, each 4-row block streams W_hh from the last-level cache, so only thin batches,
// where a GEMM per step is mostly call overhead, still favour the tiles; B = 1 does not, its one
// row running on one thread. The best thresholds move with the machine: config.py can set them.
Knob cpu_tiles_max_hidden{"cpu_tiles_max_hidden", 512};
Knob cpu_tiles_max_batch{"cpu_tiles_max_batch", 16};
// The crossover moves with the cores, caches, vector width and BLAS of each machine, and with the
// load on shared ones: measured on first use, it need not be guessed.
Knob cpu_autotune{"cpu_autotune", 1, {0, 1}};
// Each ATen GEMM of the gradients costs microseconds of dispatch and setup before it multiplies;
// the kernels' register tiles cost none, and run near BLAS speed while the layer is small.
Knob cpu_grads{"cpu_grads", {"auto", "kernels", "gemm"}, "auto"};
Knob cpu_grads_kernels_max_work{"cpu_grads_kernels_max_work", int64_t{1} << 20};
// A cell step is a few microseconds: one pass of dot products against three GEMM calls.
Knob cpu_cell{"cpu_cell", {"auto", "kernels", "gemm"}, "auto"};
// One GEMM call costs microseconds before it multiplies, more in bfloat16 (oneDNN) than in float32,
// and a 16-bit GEMM without fast instructions runs on float32 copies; the tiles cost neither, but
// BLAS blocking wins on large inputs (or AMX in bfloat16).
Knob cpu_projection{"cpu_projection", {"auto", "kernels", "gemm"}, "auto"};
// Waking ATen's pool costs microseconds: below this many multiply-adds, about that long on one
// core, a call runs on the calling thread.
Knob cpu_parallel_min_work{"cpu_parallel_min_work", int64_t{1} << 17};
// Releasing and retaking the GIL costs about as much as a small step; below this many
// multiply-adds the step is over before another thread could use the GIL.
Knob cpu_cell_gil_release_min_work{"cpu_cell_gil_release_min_work", int64_t{1} << 16};
// bfloat16 with AVX512-BF16: vdpbf16ps does two multiply-adds per lane, but where it issues at
// half an FMA's rate (as measured on Sapphire Rapids) FMAs on float32 copies are no slower and
// skip the pair shuffling; which one wins is measured per kind under auto.
Knob cpu_bf16_products{"cpu_bf16_products", {"auto", "pairs", "float32"}, "auto"};
#ifdef MYRNN_WITH_CUDA
Knob cuda_path{"cuda_path", {"auto", "registers", "shared", "gemm"}, "auto"};
Knob cuda_rows_per_block{"cuda_rows_per_block", 0, {0, 1, 2, 4, 8}};
#endif

namespace {

const std::vector<Knob*>& registry() {
  static const std::vector<Knob*> all{&cpu_isa,
                                      &cpu_path,
                                      &cpu_tiles_max_hidden,
                                      &cpu_tiles_max_batch,
                                      &cpu_autotune,
                                      &cpu_grads,
                                      &cpu_grads_kernels_max_work,
                                      &cpu_cell,
                                      &cpu_projection,
                                      &cpu_parallel_min_work,
                                      &cpu_cell_gil_release_min_work,
                                      &cpu_bf16_products,
#ifdef MYRNN_WITH_CUDA
                                      &cuda_path,
                                      &cuda_rows_per_block,
#endif
  };
  return all;
}

}  // namespace

std::map<std::string, Value> values() {
  std::map<std::string, Value> result;
  for (const Knob* k : registry()) result.emplace(k->name(), k->value());
  return result;
}

void set(std::string_view name, const Value& value) {
  for (Knob* k : registry())
    if (name == k->name()) return k->set(value);
  std::vector<std::string> names;
  for (const auto& [known, _] : values()) names.push_back(known);
  TORCH_CHECK_VALUE(false, "myrnn_fast: unknown knob '", name, "'; the knobs are ", joined(names));
}

}  // namespace myrnn_fast::knobs
