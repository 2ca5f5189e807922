// The CPU recurrence's path chosen by measurement (knob cpu_autotune), as cudnn.benchmark does for
// cuDNN's algorithms: the first call of each kind times both paths on its own data, and the faster
// one serves every later call of that kind in the process.
//
// A kind is what moves the crossover between the paths: the hidden size, the batch (by powers of
// two), the dtype, the thread count and the instruction set of the kernels, and the direction
// (forward or backward). Sequence length does not: both paths' cost grows with it alike.
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

enum class Path : int { kTiles = 0, kGemm = 1 };
const char* name(Path path);

struct Key {
  int64_t hidden;
  int64_t batch_bucket;  // the smallest power of two >= batch
  std::string dtype;
  int64_t threads;
  std::string isa;
  bool backward;

  auto tied() const { return std::tie(hidden, batch_bucket, dtype, threads, isa, backward); }
  bool operator<(const Key& other) const { return tied() < other.tied(); }
};

int64_t batch_bucket(int64_t batch);

struct Entry {
  Key key;
  Path path;                          // the faster one
  double tiles_seconds, gemm_seconds;  // the best of each path's timed runs (0 when loaded, not timed)
};

// The cached choice for `key`, if its first call has been timed.
std::optional<Path> lookup(const Key& key);
// Remembers a choice; a key already present keeps its first choice (two threads may time the same
// kind at once; one answer per kind keeps the process consistent).
void record(const Entry& entry);
std::vector<Entry> entries();
void clear();

// Runs run(path) for both paths, alternating (tiles, gemm, gemm, tiles) so that a first call's
// cold caches and a neighbour's burst of load fall on both, records the faster by its best time,
// and returns it. run(path) computes the whole recurrence into that path's own buffers and returns
// its seconds; the caller keeps the winner's buffers, so the call's results come from one
// complete run of one path.
template <typename Run>
Path measure(const Key& key, const Run& run) {
  double best[2] = {0, 0};
  bool timed[2] = {false, false};
  for (const Path path : {Path::kTiles, Path::kGemm, Path::kGemm, Path::kTiles}) {
    const int i = static_cast<int>(path);
    const double seconds = run(path);
    best[i] = timed[i] ? std::min(best[i], seconds) : seconds;
    timed[i] = true;
  }
  const Path winner = best[0] <= best[1] ? Path::kTiles : Path::kGemm;
  record({key, winner, best[0], best[1]});
  return *lookup(key);
}

}  // namespace myrnn_fast::cpu::autotune
