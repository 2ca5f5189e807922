// Op registration for the `myrnn_fast` namespace and the Python module `myrnn_fast._C`.
//
// Kernels live in their own files (one per concern); this file owns the schema definitions and
// the build report. Importing `myrnn_fast._C` runs the static registrations below, after which
// the ops are reachable as `torch.ops.myrnn_fast.*`.

#include <ATen/Config.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/version.h>

#include <pybind11/pybind11.h>

#include <sstream>
#include <string>

namespace myrnn_fast {
namespace {

#ifdef MYRNN_WITH_CUDA
constexpr bool kWithCuda = true;
#else
constexpr bool kWithCuda = false;
#endif

const char* parallel_backend() {
#if AT_PARALLEL_OPENMP
  return "OpenMP";
#elif AT_PARALLEL_NATIVE
  return "native";
#else
  return "unknown";
#endif
}

// How this extension was built, as a JSON object. Compile-time facts come from macros; the thread
// counts are read when called, because `torch.set_num_threads` may change them.
std::string build_info() {
  std::ostringstream s;
  s << "{\"compiler\": \"" << MYRNN_CXX_COMPILER << "\""
    << ", \"cplusplus\": " << __cplusplus
    << ", \"build_type\": \"" << MYRNN_BUILD_TYPE << "\""
    << ", \"torch\": \"" << TORCH_VERSION << "\""
    << ", \"cxx11_abi\": " << (_GLIBCXX_USE_CXX11_ABI ? "true" : "false")
    << ", \"cuda\": " << (kWithCuda ? "true" : "false")
    << ", \"parallel_backend\": \"" << parallel_backend() << "\""
    << ", \"num_threads\": " << at::get_num_threads() << "}";
  return s.str();
}

}  // namespace
}  // namespace myrnn_fast

TORCH_LIBRARY(myrnn_fast, m) {
  m.def("build_info() -> str", &myrnn_fast::build_info);
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "myrnn_fast native extension: importing it registers the torch.ops.myrnn_fast ops.";
}
