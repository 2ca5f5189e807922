// The shape of one layer's sequence as every recurrence kernel sees it, CPU and CUDA alike.
// Torch-free: the ATen glue (ops/rnn_checks.h) validates a call and describes it with this.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define MYRNN_HOST_DEVICE __host__ __device__
#else
#define MYRNN_HOST_DEVICE
#endif

namespace myrnn_fast {

// seq_len steps over up to `batch` rows; every buffer the kernels take is [rows, hidden], row
// stride `hidden`, the rows of step t from packed row offsets[t] on. Dense input leaves both
// arrays null: `batch` rows at every step, step t from row t * batch. Packed input (as in a
// PackedSequence): batch_sizes[t] is the number of rows active at step t (non-increasing, the
// first equal to `batch`), and the arrays live where the kernel runs (host or device memory).
struct Sequence {
  int64_t seq_len = 0;
  int64_t batch = 0;
  int64_t hidden = 0;
  const int64_t* batch_sizes = nullptr;  // [seq_len], or null for dense input
  const int64_t* offsets = nullptr;      // [seq_len], or null for dense input
};

// Step t of a sequence: its rows start at packed row `offset`; `batch_size` rows are active, of
// which the first `next_batch_size` go on to step t + 1 (0 after the last step) and the others
// end here. Row r of step t continues row r of step t - 1, at packed row offset(t - 1) + r.
struct Step {
  int64_t offset, batch_size, next_batch_size;
};

MYRNN_HOST_DEVICE inline Step step_at(const Sequence& s, int64_t t) {
  const bool last = t + 1 >= s.seq_len;
  if (!s.batch_sizes) return {t * s.batch, s.batch, last ? 0 : s.batch};
  return {s.offsets[t], s.batch_sizes[t], last ? 0 : s.batch_sizes[t + 1]};
}

}  // namespace myrnn_fast
