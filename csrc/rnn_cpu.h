// Knobs of the CPU implementation, exposed to Python through myrnn_fast._C for tests,
// benchmarks and `myrnn-fast info`. The ops themselves are reached through torch.ops.
#pragma once

#include <string>
#include <vector>

namespace myrnn_fast::cpu {

// The instruction set whose kernels run ("baseline", "avx2", "avx512"): the best one this CPU
// supports, or the one named by MYRNN_CPU_ISA when the process started.
std::string cpu_isa();
std::vector<std::string> cpu_isas();  // the ones this CPU and build support
void set_cpu_isa(const std::string& isa);

// How the recurrence runs: "auto" (by hidden size), "kernel" (register-tiled) or "blas".
std::string cpu_path();
void set_cpu_path(const std::string& path);

}  // namespace myrnn_fast::cpu
