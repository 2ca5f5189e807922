// The autotuned choices' cache (see autotune.h): one map for the process, behind a mutex, since ops run
// on many threads with the GIL released.

#include "ops/autotune.h"

namespace myrnn_fast::cpu::autotune {

namespace {

std::mutex& lock() {
  static std::mutex m;
  return m;
}

std::map<Key, Entry>& cache() {
  static std::map<Key, Entry> c;
  return c;
}

}  // namespace

namespace {
constexpr const char* kPassNames[] = {"forward", "backward", "grads", "grads+dx", "cell", "bf16 forward", "bf16 backward",
                                     "projection"};
constexpr int kPasses = sizeof(kPassNames) / sizeof(kPassNames[0]);
}  // namespace

const char* name(Pass pass) { return kPassNames[static_cast<int>(pass)]; }

bool is_recurrence(Pass pass) {
  return pass != Pass::kGrads && pass != Pass::kGradsDx && pass != Pass::kCell && pass != Pass::kProjection;
}

const char* name(Pass pass, Path path) {
  if (pass == Pass::kBf16Forward || pass == Pass::kBf16Backward) return path == Path::kGemm ? "float32" : "pairs";
  if (path == Path::kGemm) return "gemm";
  return pass == Pass::kForward || pass == Pass::kBackward ? "tiles" : "kernels";
}

std::optional<Pass> pass_named(const std::string& name) {
  for (int i = 0; i < kPasses; ++i)
    if (name == kPassNames[i]) return static_cast<Pass>(i);
  return std::nullopt;
}

std::optional<Path> path_named(Pass pass, const std::string& path) {
  for (const Path p : {Path::kKernels, Path::kGemm})
    if (path == name(pass, p)) return p;
  return std::nullopt;
}

int64_t bucket(int64_t n) {
  int64_t b = 1;
  while (b < n) b <<= 1;
  return b;
}

std::optional<Path> lookup(const Key& key) {
  std::lock_guard<std::mutex> guard(lock());
  const auto it = cache().find(key);
  if (it == cache().end()) return std::nullopt;
  return it->second.path;
}

void record(const Entry& entry) {
  std::lock_guard<std::mutex> guard(lock());
  cache().emplace(entry.key, entry);
}

std::vector<Entry> entries() {
  std::lock_guard<std::mutex> guard(lock());
  std::vector<Entry> all;
  for (const auto& [_, entry] : cache()) all.push_back(entry);
  return all;
}

void clear() {
  std::lock_guard<std::mutex> guard(lock());
  cache().clear();
}

}  // namespace myrnn_fast::cpu::autotune
