// The CPU op's paths chosen by measurement (knob cpu_autotune), as cudnn.benchmark does for cuDNN's
// algorithms: the first call of each kind times both candidates on its own data, and the faster
// one serves every later call of that kind in the process. These choices are made this way:
//  - the forward recurrence and the backward (reverse) recurrence: the register tiles or one BLAS
//    GEMM per step;
//  - the backward's weight gradients (and grad x): summed in the kernels' register tiles or formed
//    by ATen GEMMs, whose fixed cost per call dominates at small sizes;
//  - one RNNCell step: the kernels' dot products or ATen GEMMs;
//  - the forward's input projection of every step: the kernels' register tiles or one ATen GEMM;
//  - where the tiles run a bfloat16 recurrence with AVX512-BF16, forward and reverse: their
//    products by vdpbf16ps on 16-bit pairs, or by FMAs on float32 copies of the state and W_hh.
//
// A kind is what moves the crossover: the pass, the hidden size, the input size (for the
// gradients and the cell only: the recurrences never read it), the batch and the sequence length
// (each by powers of two: per-call costs such as packing W_hh weigh more in a short sequence),
// the dtype, the thread count and the instruction set of the kernels.
#pragma once

#include <algorithm>
#include <cstdint>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace myrnn_fast::cpu::autotune {

// What is chosen: the forward or reverse recurrence, the backward's gradients (with or without
// grad x, whose GEMM moves that crossover), or an RNNCell step.
// kBf16Forward and kBf16Backward: the bfloat16 tiles' products, in the recurrences of those passes.
// kProjection: the forward's input projection of every step (input size above 1).
enum class Pass : int { kForward = 0, kBackward = 1, kGrads = 2, kGradsDx = 3, kCell = 4, kBf16Forward = 5,
                        kBf16Backward = 6, kProjection = 7 };
// The two candidates: kKernels is the kernels of kernels/cpu (named "tiles" for the recurrences,
// "kernels" for the gradients and the cell), kGemm the BLAS route. For the bfloat16 products'
// passes, kKernels is "pairs" (vdpbf16ps) and kGemm "float32" (FMAs on float32 copies).
enum class Path : int { kKernels = 0, kGemm = 1 };

const char* name(Pass pass);
bool is_recurrence(Pass pass);  // whether the input size is not part of the kind (Key::input 0)
const char* name(Pass pass, Path path);
std::optional<Pass> pass_named(const std::string& name);
std::optional<Path> path_named(Pass pass, const std::string& name);

struct Key {
  Pass pass;
  int64_t hidden;
  int64_t input;         // 0 for the recurrences, which never read it
  int64_t batch_bucket;  // the smallest power of two >= batch
  int64_t steps_bucket;  // the smallest power of two >= sequence length
  std::string dtype;
  int64_t threads;
  std::string isa;

  auto tied() const { return std::tie(pass, hidden, input, batch_bucket, steps_bucket, dtype, threads, isa); }
  bool operator<(const Key& other) const { return tied() < other.tied(); }
};

int64_t bucket(int64_t n);  // the smallest power of two >= n (1 for n <= 1)

struct Entry {
  Key key;
  Path path;          // the faster one
  double seconds[2];  // the best of each path's timed runs, by Path (0 when loaded, not timed)
};

// The cached choice for `key`, if its first call has been timed.
std::optional<Path> lookup(const Key& key);
// Remembers a choice; a key already present keeps its first choice (two threads may time the same
// kind at once; one answer per kind keeps the process consistent).
void record(const Entry& entry);
std::vector<Entry> entries();
void clear();

// Runs run(path) for both paths `pairs` times each, alternating (kernels, gemm, gemm, kernels,
// ...) so that a first call's cold caches and a neighbour's burst of load fall on both, records
// the faster by its best time, and returns it. run(path) computes the whole result into that
// path's own buffers and returns its seconds; the caller keeps the winner's buffers, so the call's
// results come from one complete run of one path. (A call of microseconds, such as a cell step,
// takes more pairs: one preemption of the thread would otherwise decide.) With `warm_up`, each
// path first runs once untimed: oneDNN builds a GEMM primitive on the first calls of each shape
// (a bfloat16 GEMM of [3200, 128] x [128, 128]: 2.6 ms, 0.47 ms, then 0.15 and 0.11 ms on an
// AVX-512 Xeon), which would otherwise decide a pass of one or a few GEMM calls against them.
template <typename Run>
Path measure(const Key& key, const Run& run, int pairs = 2, bool warm_up = false) {
  double best[2] = {0, 0};
  bool timed[2] = {false, false};
  if (warm_up)
    for (const Path path : {Path::kKernels, Path::kGemm}) run(path);
  for (int round = 0; round < 2 * pairs; ++round) {
    const bool kernels_first = round % 4 == 0 || round % 4 == 3;
    const Path path = kernels_first ? Path::kKernels : Path::kGemm;
    const int i = static_cast<int>(path);
    const double seconds = run(path);
    best[i] = timed[i] ? std::min(best[i], seconds) : seconds;
    timed[i] = true;
  }
  const Path winner = best[0] <= best[1] ? Path::kKernels : Path::kGemm;
  record({key, winner, {best[0], best[1]}});
  return *lookup(key);
}

}  // namespace myrnn_fast::cpu::autotune
