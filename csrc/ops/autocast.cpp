// The ops under autocast: rnn_forward and rnn_cell run in autocast's lower-precision dtype, as
// torch.nn's RNN ops (rnn_tanh, rnn_relu and their cells) do. Registered with the dispatcher's
// Autocast keys, so a direct op call, torch.compile and torch.export see the same casts as eager.
// (myrnn_fast.RNN / RNNCell cast once in the module layer, for every backend, and call the
// backends with autocast off; these kernels are for the ops reached any other way.)
//
// The dtype is read at call time (torch.get_autocast_dtype): torch.library.register_autocast
// would fix one dtype when registering, and autocast may run in float16 or bfloat16.
// rnn_backward is not registered: it runs in whatever dtype its forward ran in.

#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace myrnn_fast {
namespace {

using Forward = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                    const at::Tensor&, const std::optional<at::Tensor>&,
                                                    const std::optional<at::Tensor>&,
                                                    const std::optional<at::Tensor>&, c10::string_view);
using Cell = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                        const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, c10::string_view);

// op(args...) with autocast's rule for the lower-precision list: floating tensors on the device,
// float64 excepted, cast to the current autocast dtype (weights through autocast's cache), then
// the op below the Autocast key.
template <c10::DeviceType Device, typename Signature, typename... Args>
auto lower_precision(const char* name, const Args&... args) {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
  c10::impl::ExcludeDispatchKeyGuard no_autocast(at::autocast::get_autocast_dispatch_key_from_device_type(Device));
  const at::ScalarType dtype = at::autocast::get_lower_precision_fp_from_device_type(Device);
  return op.call(at::autocast::cached_cast(dtype, args, Device)...);
}

template <c10::DeviceType Device>
std::tuple<at::Tensor, at::Tensor> rnn_forward(const at::Tensor& x, const at::Tensor& h0, const at::Tensor& w_ih,
                                               const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
                                               const std::optional<at::Tensor>& b_hh,
                                               const std::optional<at::Tensor>& batch_sizes,
                                               c10::string_view nonlinearity) {
  // batch_sizes is int64: cached_cast leaves it as it is.
  return lower_precision<Device, Forward>("myrnn_fast::rnn_forward", x, h0, w_ih, w_hh, b_ih, b_hh, batch_sizes,
                                          nonlinearity);
}

template <c10::DeviceType Device>
at::Tensor rnn_cell(const at::Tensor& x, const at::Tensor& h, const at::Tensor& w_ih, const at::Tensor& w_hh,
                    const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh,
                    c10::string_view nonlinearity) {
  return lower_precision<Device, Cell>("myrnn_fast::rnn_cell", x, h, w_ih, w_hh, b_ih, b_hh, nonlinearity);
}

}  // namespace
}  // namespace myrnn_fast

TORCH_LIBRARY_IMPL(myrnn_fast, AutocastCPU, m) {
  m.impl("rnn_forward", &myrnn_fast::rnn_forward<c10::DeviceType::CPU>);
  m.impl("rnn_cell", &myrnn_fast::rnn_cell<c10::DeviceType::CPU>);
}

// Registered in every build: without CUDA kernels nothing reaches this key.
TORCH_LIBRARY_IMPL(myrnn_fast, AutocastCUDA, m) {
  m.impl("rnn_forward", &myrnn_fast::rnn_forward<c10::DeviceType::CUDA>);
  m.impl("rnn_cell", &myrnn_fast::rnn_cell<c10::DeviceType::CUDA>);
}
