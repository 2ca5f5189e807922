// The autotuned path cache (see autotune.h): one map for the process, behind a mutex, since ops run
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

const char* name(Path path) { return path == Path::kTiles ? "tiles" : "gemm"; }

int64_t batch_bucket(int64_t batch) {
  int64_t bucket = 1;
  while (bucket < batch) bucket <<= 1;
  return bucket;
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
