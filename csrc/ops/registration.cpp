// Op registration for the `myrnn_fast` namespace and the Python module `myrnn_fast._C`.
//
// The ops' implementations live in rnn_cpu.cpp and rnn_cuda.cpp; this file owns the schema
// definitions, the build report and the pybind11 module (ops without dispatch, knobs). Importing
// `myrnn_fast._C` runs the static registrations below, after which the ops are reachable as
// `torch.ops.myrnn_fast.*`.

#include <ATen/Config.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>  // at::AutoDispatchBelowADInplaceOrView
#include <torch/library.h>
#include <torch/version.h>

#include <torch/csrc/utils/pybind.h>  // at::Tensor <-> torch.Tensor for pybind11
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "ops/autotune.h"
#include "ops/eager.h"
#include "ops/knobs.h"
#include "ops/rnn_cpu.h"
#include "ops/rnn_stack.h"
#ifdef MYRNN_WITH_CUDA
#include "ops/rnn_cuda.h"
#endif

#include <optional>
#include <sstream>
#include <string>
#include <string_view>
#include <tuple>
#include <vector>

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
    << ", \"num_threads\": " << at::get_num_threads()
    << ", \"cpu_isa\": \"" << cpu::isa_in_use() << "\""
    << ", \"cpu_conversions\": \"" << cpu::conversions_in_use() << "\"}";
  return s.str();
}

// A kernel as an entry point that records no graph: the ATen ops inside (views, copies, GEMMs)
// skip the Autograd and ADInplaceOrView dispatch keys, as a kernel registered for a backend key
// does under the dispatcher (ops/eager.cpp's nodes do the same). At a tiny shape those two keys
// cost a third of the call.
template <typename R, typename... Args>
auto below_autograd(R (*kernel)(Args...)) {
  return [kernel](Args... args) -> R {
    const at::AutoDispatchBelowADInplaceOrView guard;
    return kernel(std::forward<Args>(args)...);
  };
}

// A module attribute as the whole-call entries read it, or nullopt where it is not exactly of
// that type (a user may set an attribute to anything): the entry then declines, and the module's
// Python path says what is wrong, as torch.nn would. Read with the GIL held.
std::optional<int64_t> exact_int(pybind11::handle h) {
  if (!PyLong_CheckExact(h.ptr())) return std::nullopt;
  int overflow = 0;
  const long long value = PyLong_AsLongLongAndOverflow(h.ptr(), &overflow);
  return overflow ? std::nullopt : std::optional<int64_t>(value);
}

std::optional<bool> exact_bool(pybind11::handle h) {
  return PyBool_Check(h.ptr()) ? std::optional<bool>(h.ptr() == Py_True) : std::nullopt;
}

// A view of the string's UTF-8, which lives as long as the (referenced) string object.
std::optional<std::string_view> exact_str(pybind11::handle h) {
  if (!PyUnicode_CheckExact(h.ptr())) return std::nullopt;
  Py_ssize_t size = 0;
  const char* data = PyUnicode_AsUTF8AndSize(h.ptr(), &size);
  if (data == nullptr) {
    PyErr_Clear();
    return std::nullopt;
  }
  return std::string_view(data, static_cast<size_t>(size));
}

at::Tensor or_undefined(const std::optional<at::Tensor>& t) { return t.value_or(at::Tensor()); }

}  // namespace
}  // namespace myrnn_fast

// One layer in one direction (the kernel contract of myrnn_fast.backends): x is [T, B, I], or
// packed rows [N, I] with batch_sizes (int64, CPU) giving the active rows of each step.
// Forward saves nothing but its output; the backward takes it back, and its gradients for
// undefined grad_out / grad_h_n are those of zeros. grad_x is empty unless need_grad_x.
TORCH_LIBRARY(myrnn_fast, m) {
  m.def(
      "rnn_forward(Tensor x, Tensor h0, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, "
      "Tensor? batch_sizes, str nonlinearity) -> (Tensor out, Tensor h_n)");
  m.def(
      "rnn_backward(Tensor? grad_out, Tensor? grad_h_n, Tensor x, Tensor h0, Tensor w_ih, Tensor w_hh, "
      "Tensor out, Tensor? batch_sizes, str nonlinearity, bool need_grad_x) -> "
      "(Tensor grad_x, Tensor grad_h0, Tensor grad_w_ih, Tensor grad_w_hh, Tensor grad_b)");
  m.def(
      "rnn_cell(Tensor x, Tensor h, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, "
      "str nonlinearity) -> Tensor");
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "myrnn_fast native extension: importing it registers the torch.ops.myrnn_fast ops.";
  namespace cpu = myrnn_fast::cpu;
  // Through pybind11, not the dispatcher: a build report is a plain string that nothing traces,
  // dispatches or differentiates, so an op schema would add machinery and nothing else.
  m.def("build_info", &myrnn_fast::build_info, "how this extension was built, as a JSON object");
  // c10's errors as the Python exceptions torch.ops would raise for them, without C++ frames.
  pybind11::register_local_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const c10::ValueError& e) {
      PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
    } catch (const c10::TypeError& e) {
      PyErr_SetString(PyExc_TypeError, e.what_without_backtrace());
    } catch (const c10::Error& e) {
      PyErr_SetString(PyExc_RuntimeError, e.what_without_backtrace());
    }
  });
  // The kernels of one layer and of one cell step, without dispatcher or autograd: what
  // benchmarks time as "the kernel" (myrnn_fast.benchmark.overhead) and tests compare with the ops.
  // Like torch's own ops they let other Python threads run meanwhile.
  const auto no_gil = pybind11::call_guard<pybind11::gil_scoped_release>();
  m.def("rnn_forward_cpu", myrnn_fast::below_autograd(&cpu::rnn_forward),
        "rnn_forward's CPU kernel, without dispatch or autograd", no_gil, pybind11::arg("x"), pybind11::arg("h0"),
        pybind11::arg("w_ih"), pybind11::arg("w_hh"), pybind11::arg("b_ih"), pybind11::arg("b_hh"),
        pybind11::arg("batch_sizes"), pybind11::arg("nonlinearity"));
  m.def("rnn_cell_cpu", myrnn_fast::below_autograd(&cpu::rnn_cell),
        "rnn_cell's CPU kernel, without dispatch or autograd", no_gil, pybind11::arg("x"), pybind11::arg("h"),
        pybind11::arg("w_ih"), pybind11::arg("w_hh"), pybind11::arg("b_ih"), pybind11::arg("b_hh"),
        pybind11::arg("nonlinearity"));
  m.def("rnn_backward_cpu", myrnn_fast::below_autograd(&cpu::rnn_backward),
        "rnn_backward's CPU kernel, without dispatch or autograd", no_gil, pybind11::arg("grad_out"),
        pybind11::arg("grad_h_n"), pybind11::arg("x"), pybind11::arg("h0"), pybind11::arg("w_ih"),
        pybind11::arg("w_hh"), pybind11::arg("out"), pybind11::arg("batch_sizes"), pybind11::arg("nonlinearity"),
        pybind11::arg("need_grad_x"));
  // The eager route (ops/eager.h): a whole RNN, layers and directions, or an RNNCell step in one
  // call, on the tensors' device, with its autograd node recorded in C++.
  namespace stack = myrnn_fast::stack;
  namespace eager = myrnn_fast::eager;
  using myrnn_fast::exact_bool, myrnn_fast::exact_int, myrnn_fast::exact_str, myrnn_fast::or_undefined;
  m.def(
      "rnn_stack",
      [](const at::Tensor& x, const at::Tensor& hx, const std::vector<at::Tensor>& weights,
         const std::optional<at::Tensor>& batch_sizes, const std::optional<at::Tensor>& reverse_index,
         int64_t num_layers, bool bidirectional, bool bias, std::string_view nonlinearity) {
        return eager::stack(x, hx, weights, batch_sizes, reverse_index,
                            {num_layers, bidirectional, bias, nonlinearity});
      },
      "[out, h_n] of every layer and direction at once, differentiable", no_gil, pybind11::arg("x"),
      pybind11::arg("hx"), pybind11::arg("weights"), pybind11::arg("batch_sizes"), pybind11::arg("reverse_index"),
      pybind11::arg("num_layers"), pybind11::arg("bidirectional"), pybind11::arg("bias"),
      pybind11::arg("nonlinearity"));
  // The whole-call entries read the module's attributes as they are (exact_int and the others
  // above) and decline what is not the usual call, so that the module's Python path answers it.
  m.def(
      "rnn_module_forward",
      [](const at::Tensor& input, const std::optional<at::Tensor>& hx,
         const std::vector<std::optional<at::Tensor>>& weights, pybind11::handle num_layers,
         pybind11::handle bidirectional, pybind11::handle bias, pybind11::handle nonlinearity,
         pybind11::handle batch_first, pybind11::handle input_size,
         pybind11::handle hidden_size) -> std::optional<std::tuple<at::Tensor, at::Tensor>> {
        const auto layers = exact_int(num_layers), in = exact_int(input_size), hidden = exact_int(hidden_size);
        const auto both = exact_bool(bidirectional), biased = exact_bool(bias), first = exact_bool(batch_first);
        const auto name = exact_str(nonlinearity);
        if (!layers || !in || !hidden || !both || !biased || !first || !name) return std::nullopt;
        std::vector<at::Tensor> w;
        w.reserve(weights.size());
        for (const auto& t : weights) w.push_back(or_undefined(t));
        pybind11::gil_scoped_release no_gil;
        return eager::module_forward(input, hx, w, {*in, *hidden, *first, {*layers, *both, *biased, *name}});
      },
      "RNN.forward's (out, h_n) for a plain CPU tensor, or None where the module's Python path must run (eager.h)",
      pybind11::arg("input"), pybind11::arg("hx"), pybind11::arg("weights"), pybind11::arg("num_layers"),
      pybind11::arg("bidirectional"), pybind11::arg("bias"), pybind11::arg("nonlinearity"),
      pybind11::arg("batch_first"), pybind11::arg("input_size"), pybind11::arg("hidden_size"));
  // A small step is over before another thread could take the GIL: only larger ones let it go.
  m.def(
      "rnn_cell",
      [](const at::Tensor& x, const at::Tensor& h, const at::Tensor& w_ih, const at::Tensor& w_hh,
         const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh, c10::string_view nonlinearity) {
        const int64_t multiply_adds = h.dim() == 2 ? h.size(0) * (w_ih.numel() + w_hh.numel()) : 0;
        if (multiply_adds < myrnn_fast::knobs::cpu_cell_gil_release_min_work.get())
          return eager::cell(x, h, w_ih, w_hh, b_ih, b_hh, nonlinearity);
        pybind11::gil_scoped_release no_gil_while_computing;
        return eager::cell(x, h, w_ih, w_hh, b_ih, b_hh, nonlinearity);
      },
      "one RNNCell step, differentiable", pybind11::arg("x"), pybind11::arg("h"), pybind11::arg("w_ih"),
      pybind11::arg("w_hh"), pybind11::arg("b_ih"), pybind11::arg("b_hh"), pybind11::arg("nonlinearity"));
  m.def(
      "rnn_cell_module_forward",
      [](const at::Tensor& input, const std::optional<at::Tensor>& hx, const std::optional<at::Tensor>& w_ih,
         const std::optional<at::Tensor>& w_hh, const std::optional<at::Tensor>& b_ih,
         const std::optional<at::Tensor>& b_hh, pybind11::handle nonlinearity, pybind11::handle input_size,
         pybind11::handle hidden_size) -> std::optional<at::Tensor> {
        const auto name = exact_str(nonlinearity);
        const auto in = exact_int(input_size), hidden = exact_int(hidden_size);
        if (!name || !in || !hidden || !w_ih || !w_hh) return std::nullopt;
        const int64_t multiply_adds = (input.dim() == 2 ? input.size(0) : 1) * (w_ih->numel() + w_hh->numel());
        if (multiply_adds < myrnn_fast::knobs::cpu_cell_gil_release_min_work.get())
          return eager::cell_module_forward(input, hx, *w_ih, *w_hh, b_ih, b_hh, *name, *in, *hidden);
        pybind11::gil_scoped_release no_gil_while_computing;
        return eager::cell_module_forward(input, hx, *w_ih, *w_hh, b_ih, b_hh, *name, *in, *hidden);
      },
      "RNNCell.forward's h' for plain CPU tensors, or None where the module's Python path must run (eager.h)",
      pybind11::arg("input"), pybind11::arg("hx"), pybind11::arg("w_ih"), pybind11::arg("w_hh"),
      pybind11::arg("b_ih"), pybind11::arg("b_hh"), pybind11::arg("nonlinearity"), pybind11::arg("input_size"),
      pybind11::arg("hidden_size"));
  m.def("autograd_floor", &eager::no_work,
        "a layer's inputs and outputs through a C++ autograd node that does no work (benchmarks)", pybind11::arg("x"),
        pybind11::arg("weights"), pybind11::arg("hidden"));
  m.def(
      "set_graph_backward",
      [](pybind11::function fn) {
        // Kept for the life of the process (never destroyed: the interpreter may be gone by then).
        auto* held = new pybind11::function(std::move(fn));
        eager::set_graph_backward([held](const eager::GraphBackwardCall& c) {
          pybind11::gil_scoped_acquire gil;
          const auto none_if_undefined = [](const std::vector<at::Tensor>& ts) {
            std::vector<std::optional<at::Tensor>> out;
            for (const at::Tensor& t : ts) out.push_back(t.defined() ? std::optional<at::Tensor>(t) : std::nullopt);
            return out;
          };
          try {
            const auto grads = (*held)(c.kind, none_if_undefined(c.inputs), none_if_undefined(c.grads), c.needed,
                                       c.batch_sizes, c.reverse_index, c.num_layers, c.bidirectional, c.bias,
                                       c.nonlinearity)
                                   .cast<std::vector<std::optional<at::Tensor>>>();
            std::vector<at::Tensor> result;
            for (const auto& g : grads) result.push_back(g.value_or(at::Tensor()));
            return result;
          } catch (pybind11::error_already_set& e) {
            throw std::runtime_error(e.what());  // as a C++ error, with the GIL still held
          }
        });
      },
      "install the differentiable backward that eager calls use under create_graph=True", pybind11::arg("fn"));
  // The kernels of a whole RNN without autograd (benchmarks and tests): see ops/rnn_stack.h.
  m.def(
      "rnn_stack_forward",
      [](const at::Tensor& x, const at::Tensor& hx, const std::vector<at::Tensor>& weights,
         const std::optional<at::Tensor>& batch_sizes, const std::optional<at::Tensor>& reverse_index,
         int64_t num_layers, bool bidirectional, bool bias, std::string_view nonlinearity, bool save) {
        const at::AutoDispatchBelowADInplaceOrView guard;  // as below_autograd
        return stack::stack_forward(x, hx, weights, batch_sizes, reverse_index,
                                    {num_layers, bidirectional, bias, nonlinearity}, save);
      },
      "[out, h_n] of every layer and direction at once (then, with save, what rnn_stack_backward takes)", no_gil,
      pybind11::arg("x"), pybind11::arg("hx"), pybind11::arg("weights"), pybind11::arg("batch_sizes"),
      pybind11::arg("reverse_index"), pybind11::arg("num_layers"), pybind11::arg("bidirectional"),
      pybind11::arg("bias"), pybind11::arg("nonlinearity"), pybind11::arg("save"));
  m.def(
      "rnn_stack_backward",
      [](const std::optional<at::Tensor>& grad_out, const std::optional<at::Tensor>& grad_h_n, const at::Tensor& x,
         const at::Tensor& hx, const std::vector<at::Tensor>& weights, const std::vector<at::Tensor>& saved,
         const std::optional<at::Tensor>& batch_sizes, const std::optional<at::Tensor>& reverse_index,
         int64_t num_layers, bool bidirectional, bool bias, std::string_view nonlinearity, bool need_grad_x) {
        const at::AutoDispatchBelowADInplaceOrView guard;  // as below_autograd
        return stack::stack_backward(grad_out, grad_h_n, x, hx, weights, saved, batch_sizes, reverse_index,
                                     {num_layers, bidirectional, bias, nonlinearity}, need_grad_x);
      },
      "[grad_x, grad_hx, then one gradient per weight] of an rnn_stack_forward(..., save=True)", no_gil,
      pybind11::arg("grad_out"), pybind11::arg("grad_h_n"), pybind11::arg("x"), pybind11::arg("hx"),
      pybind11::arg("weights"), pybind11::arg("saved"), pybind11::arg("batch_sizes"), pybind11::arg("reverse_index"),
      pybind11::arg("num_layers"), pybind11::arg("bidirectional"), pybind11::arg("bias"),
      pybind11::arg("nonlinearity"), pybind11::arg("need_grad_x"));
#ifdef MYRNN_WITH_CUDA
  // The same for CUDA tensors: the kernels only enqueue work on the current stream.
  namespace cuda = myrnn_fast::cuda;
  m.def("rnn_forward_cuda", myrnn_fast::below_autograd(&cuda::rnn_forward),
        "rnn_forward's CUDA kernel, without dispatch or autograd", no_gil, pybind11::arg("x"), pybind11::arg("h0"),
        pybind11::arg("w_ih"), pybind11::arg("w_hh"), pybind11::arg("b_ih"), pybind11::arg("b_hh"),
        pybind11::arg("batch_sizes"), pybind11::arg("nonlinearity"));
  m.def("rnn_backward_cuda", myrnn_fast::below_autograd(&cuda::rnn_backward),
        "rnn_backward's CUDA kernel, without dispatch or autograd", no_gil, pybind11::arg("grad_out"),
        pybind11::arg("grad_h_n"), pybind11::arg("x"), pybind11::arg("h0"), pybind11::arg("w_ih"),
        pybind11::arg("w_hh"), pybind11::arg("out"), pybind11::arg("batch_sizes"), pybind11::arg("nonlinearity"),
        pybind11::arg("need_grad_x"));
  m.def("rnn_cell_cuda", myrnn_fast::below_autograd(&cuda::rnn_cell),
        "rnn_cell's CUDA kernel, without dispatch or autograd", no_gil, pybind11::arg("x"), pybind11::arg("h"),
        pybind11::arg("w_ih"), pybind11::arg("w_hh"), pybind11::arg("b_ih"), pybind11::arg("b_hh"),
        pybind11::arg("nonlinearity"));
#endif
  // myrnn_fast/config.py owns the knobs' documentation and environment variables.
  m.def("knobs", &myrnn_fast::knobs::values, "every knob's current value, by name");
  m.def(
      "set_knob",
      [](std::string_view name, const pybind11::handle& value) {
        // str and int as they are; anything else (bool, float, an int past 64 bits) by its text,
        // which no knob accepts: a ValueError that lists the valid values.
        namespace py = pybind11;
        if (py::isinstance<py::int_>(value) && !py::isinstance<py::bool_>(value)) {
          int overflow = 0;
          const long long number = PyLong_AsLongLongAndOverflow(value.ptr(), &overflow);
          if (!overflow) return myrnn_fast::knobs::set(name, int64_t{number});
        }
        myrnn_fast::knobs::set(name, py::str(value).cast<std::string>());
      },
      "set one knob; ValueError for an unknown name or an invalid value", pybind11::arg("name"),
      pybind11::arg("value"));
  m.def(
      "autotune_cache",
      [] {
        namespace autotune = myrnn_fast::cpu::autotune;
        pybind11::list result;
        for (const autotune::Entry& e : autotune::entries()) {
          pybind11::dict d, ms;
          d["pass"] = autotune::name(e.key.pass);
          d["hidden"] = e.key.hidden;
          d["input"] = e.key.input;
          d["batch_max"] = e.key.batch_bucket;
          d["steps_max"] = e.key.steps_bucket;
          d["dtype"] = e.key.dtype;
          d["threads"] = e.key.threads;
          d["isa"] = e.key.isa;
          d["path"] = autotune::name(e.key.pass, e.path);
          for (const autotune::Path p : {autotune::Path::kKernels, autotune::Path::kGemm}) {
            const double seconds = e.seconds[static_cast<int>(p)];
            if (seconds > 0) ms[autotune::name(e.key.pass, p)] = seconds * 1e3;  // 0: loaded, not timed
          }
          d["times_ms"] = ms;
          result.append(d);
        }
        return result;
      },
      "the CPU paths chosen by measurement so far (knob cpu_autotune), one dict per kind of call");
  m.def("autotune_clear", &myrnn_fast::cpu::autotune::clear, "forget every measured path choice");
  m.def(
      "autotune_record",
      [](const std::string& pass_name, int64_t hidden, int64_t input, int64_t batch_max, int64_t steps_max,
         const std::string& dtype, int64_t threads, const std::string& isa, const std::string& path_name) {
        namespace autotune = myrnn_fast::cpu::autotune;
        const auto pass = autotune::pass_named(pass_name);
        TORCH_CHECK_VALUE(pass, "pass must be forward, backward, grads, grads+dx, cell, bf16 forward, bf16 backward or projection, got ",
                          pass_name);
        const auto path = autotune::path_named(*pass, path_name);
        TORCH_CHECK_VALUE(path, "path must be ", autotune::name(*pass, autotune::Path::kKernels), " or ",
                          autotune::name(*pass, autotune::Path::kGemm), " for pass ",
                          pass_name, ", got ", path_name);
        for (const int64_t n : {batch_max, steps_max})
          TORCH_CHECK_VALUE(n >= 1 && autotune::bucket(n) == n, "batch_max and steps_max must be powers of two, got ", n);
        TORCH_CHECK_VALUE(hidden >= 1 && (autotune::is_recurrence(*pass) ? input == 0 : input >= 1),
                          "hidden must be >= 1, and input 0 for the recurrences' passes and >= 1 for the others");
        TORCH_CHECK_VALUE(*pass != autotune::Pass::kCell || steps_max == 1, "a cell's steps_max is 1, got ", steps_max);
        autotune::record({{*pass, hidden, input, batch_max, steps_max, dtype, threads, isa}, *path, {0.0, 0.0}});
      },
      "remember a path choice made earlier (a saved cache); a kind already measured keeps its choice",
      pybind11::arg("pass"), pybind11::arg("hidden"), pybind11::arg("input"), pybind11::arg("batch_max"),
      pybind11::arg("steps_max"), pybind11::arg("dtype"), pybind11::arg("threads"), pybind11::arg("isa"),
      pybind11::arg("path"));
  m.def("cpu_isas", &cpu::cpu_isas, "instruction sets this CPU and build support (knob cpu_isa's choices)");
}
