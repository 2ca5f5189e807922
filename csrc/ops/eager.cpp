// The eager route's autograd nodes (see eager.h): torch::autograd::Function classes around the
// stack and cell kernels. Their forward saves what the kernels' backward takes; their backward
// calls it, or, when the backward itself is being recorded (create_graph=True), the
// differentiable fallback installed from Python.

#include "ops/eager.h"

#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/csrc/autograd/custom_function.h>

#include <utility>

namespace myrnn_fast::eager {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

GraphBackward& graph_backward() {
  static GraphBackward fn;
  return fn;
}

std::optional<at::Tensor> defined_or_none(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

bool any_requires_grad(const std::vector<at::Tensor>& ts) {
  for (const at::Tensor& t : ts)
    if (t.defined() && t.requires_grad()) return true;
  return false;
}

std::vector<at::Tensor> run_graph_backward(GraphBackwardCall call) {
  TORCH_CHECK(graph_backward(), "myrnn_fast: a backward with create_graph=True needs myrnn_fast.backends._cpp, "
                                "which installs its differentiable formulas; import myrnn_fast first");
  const size_t n = call.inputs.size();
  std::vector<at::Tensor> grads = graph_backward()(call);
  TORCH_CHECK(grads.size() == n, "myrnn_fast: the differentiable backward returned ", grads.size(),
              " gradients for ", n, " inputs");
  return grads;
}

}  // namespace

// The autograd nodes, named as grad_fn shows them (CppNode<myrnn_fast::eager::RnnStack>).

// The stack's arguments that autograd does not see (nor differentiate).
struct StackArgs {
  std::optional<at::Tensor> batch_sizes, reverse_index;
  stack::Spec spec;  // its nonlinearity points into the caller's string while forward runs
};

struct RnnStack : torch::autograd::Function<RnnStack> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& hx,
                               at::TensorList weights, const StackArgs& args) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    const std::vector<at::Tensor> w(weights.begin(), weights.end());
    std::vector<at::Tensor> result =
        stack::stack_forward(x, hx, w, args.batch_sizes, args.reverse_index, args.spec, /*save=*/true);
    variable_list to_save{x, hx};
    to_save.insert(to_save.end(), w.begin(), w.end());
    to_save.insert(to_save.end(), result.begin() + 2, result.end());  // the layers' own inputs and outputs
    ctx->save_for_backward(std::move(to_save));
    ctx->saved_data["weights"] = static_cast<int64_t>(w.size());
    ctx->saved_data["batch_sizes"] = args.batch_sizes;
    ctx->saved_data["reverse_index"] = args.reverse_index;
    ctx->saved_data["num_layers"] = args.spec.num_layers;
    ctx->saved_data["bidirectional"] = args.spec.bidirectional;
    ctx->saved_data["bias"] = args.spec.bias;
    ctx->saved_data["nonlinearity"] = std::string(args.spec.nonlinearity);
    ctx->set_materialize_grads(false);  // an unused output's gradient stays undefined: the kernels read it as zeros
    return {result[0], result[1]};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const auto n = static_cast<size_t>(ctx->saved_data["weights"].toInt());
    const std::vector<at::Tensor> inputs(saved.begin(), saved.begin() + 2 + n);  // x, hx, weights
    const std::vector<at::Tensor> weights(inputs.begin() + 2, inputs.end());
    const std::vector<at::Tensor> layers(saved.begin() + 2 + n, saved.end());
    const auto batch_sizes = ctx->saved_data["batch_sizes"].toOptional<at::Tensor>();
    const auto reverse_index = ctx->saved_data["reverse_index"].toOptional<at::Tensor>();
    const std::string nonlinearity = ctx->saved_data["nonlinearity"].toStringRef();
    const stack::Spec spec{ctx->saved_data["num_layers"].toInt(), ctx->saved_data["bidirectional"].toBool(),
                           ctx->saved_data["bias"].toBool(), nonlinearity};
    std::vector<bool> needed(inputs.size());
    for (size_t i = 0; i < needed.size(); ++i) needed[i] = ctx->needs_input_grad(i);

    std::vector<at::Tensor> result;
    if (at::GradMode::is_enabled()) {
      result = run_graph_backward({"stack", inputs, {grads[0], grads[1]}, needed, batch_sizes, reverse_index,
                                   spec.num_layers, spec.bidirectional, spec.bias, nonlinearity});
    } else {
      const at::AutoDispatchBelowADInplaceOrView below_autograd;
      result = stack::stack_backward(defined_or_none(grads[0]), defined_or_none(grads[1]), inputs[0], inputs[1],
                                     weights, layers, batch_sizes, reverse_index, spec, needed[0]);
      if (!needed[0]) result[0] = at::Tensor();  // an empty placeholder, not a gradient
    }
    result.emplace_back();  // StackArgs
    return result;
  }
};

struct RnnCell : torch::autograd::Function<RnnCell> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& h, const at::Tensor& w_ih,
                            const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
                            const std::optional<at::Tensor>& b_hh, c10::string_view nonlinearity) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    at::Tensor y = stack::kernels_for(x).cell(x, h, w_ih, w_hh, b_ih, b_hh, nonlinearity);
    // The biases only for a backward recorded with create_graph=True, which reruns the step.
    ctx->save_for_backward({x, h, w_ih, w_hh, b_ih.value_or(at::Tensor()), b_hh.value_or(at::Tensor()), y});
    ctx->saved_data["nonlinearity"] = std::string(nonlinearity);
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &h = saved[1], &w_ih = saved[2], &w_hh = saved[3], &y = saved[6];
    const bool bias = saved[4].defined();
    const std::string nonlinearity = ctx->saved_data["nonlinearity"].toStringRef();
    if (at::GradMode::is_enabled()) {
      std::vector<at::Tensor> inputs(saved.begin(), saved.begin() + (bias ? 6 : 4));
      std::vector<bool> needed(inputs.size());
      for (size_t i = 0; i < needed.size(); ++i) needed[i] = ctx->needs_input_grad(i);
      std::vector<at::Tensor> result = run_graph_backward(
          {"cell", std::move(inputs), {grads[0]}, std::move(needed), std::nullopt, std::nullopt, 1, false, bias,
           nonlinearity});
      result.resize(7);  // absent biases, the nonlinearity
      return result;
    }
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    // A step is a one-step layer: its backward is the layer's with T = 1.
    const bool need_x = ctx->needs_input_grad(0);
    auto [gx, gh, gw_ih, gw_hh, gb] = stack::kernels_for(x).backward(
        grads[0].unsqueeze(0), std::nullopt, x.unsqueeze(0), h, w_ih, w_hh, y.unsqueeze(0), std::nullopt,
        nonlinearity, need_x);
    return {need_x ? gx[0] : at::Tensor(), gh, gw_ih, gw_hh, bias ? gb : at::Tensor(), bias ? gb : at::Tensor(),
            at::Tensor()};
  }
};

void set_graph_backward(GraphBackward fn) { graph_backward() = std::move(fn); }

std::vector<at::Tensor> stack(const at::Tensor& x, const at::Tensor& hx, const std::vector<at::Tensor>& weights,
                              const std::optional<at::Tensor>& batch_sizes,
                              const std::optional<at::Tensor>& reverse_index, const stack::Spec& spec) {
  if (!at::GradMode::is_enabled() || !(x.requires_grad() || hx.requires_grad() || any_requires_grad(weights))) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    return stack::stack_forward(x, hx, weights, batch_sizes, reverse_index, spec, /*save=*/false);
  }
  return RnnStack::apply(x, hx, at::TensorList(weights), StackArgs{batch_sizes, reverse_index, spec});
}

at::Tensor cell(const at::Tensor& x, const at::Tensor& h, const at::Tensor& w_ih, const at::Tensor& w_hh,
                const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh,
                c10::string_view nonlinearity) {
  const bool grad = at::GradMode::is_enabled() &&
                    (x.requires_grad() || h.requires_grad() || w_ih.requires_grad() || w_hh.requires_grad() ||
                     (b_ih && b_ih->requires_grad()) || (b_hh && b_hh->requires_grad()));
  if (!grad) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    return stack::kernels_for(x).cell(x, h, w_ih, w_hh, b_ih, b_hh, nonlinearity);
  }
  return RnnCell::apply(x, h, w_ih, w_hh, b_ih, b_hh, nonlinearity);
}

std::optional<std::tuple<at::Tensor, at::Tensor>> module_forward(const at::Tensor& input,
                                                                 const std::optional<at::Tensor>& hx,
                                                                 const std::vector<at::Tensor>& weights,
                                                                 const ModuleArgs& m) {
  // The module's checks (modules.py, RNN._check_forward_args) as one test each, in its order.
  const stack::Spec& spec = m.spec;
  const int64_t dim = input.dim();
  if (!input.is_cpu() || !at::isFloatingType(input.scalar_type()) || (dim != 2 && dim != 3)) return std::nullopt;
  if (spec.nonlinearity != "tanh" && spec.nonlinearity != "relu") return std::nullopt;
  const bool batched = dim == 3;
  at::Tensor x = batched ? input : input.unsqueeze(m.batch_first ? 0 : 1);
  if (m.batch_first) x = x.transpose(0, 1);
  const int64_t states = spec.num_layers * spec.directions(), batch = x.size(1);
  if (x.size(0) == 0 || x.size(2) != m.input_size) return std::nullopt;
  const at::ScalarType dtype = x.scalar_type();
  at::Tensor h;
  if (hx) {
    if (hx->dim() != dim) return std::nullopt;
    h = batched ? *hx : hx->unsqueeze(1);
    if (h.size(0) != states || h.size(1) != batch || h.size(2) != m.hidden_size || h.scalar_type() != dtype ||
        !h.is_cpu())
      return std::nullopt;
  } else {
    h = at::zeros({states, batch, m.hidden_size}, x.options());
  }
  if (static_cast<int64_t>(weights.size()) != states * spec.per_direction()) return std::nullopt;
  for (const at::Tensor& w : weights)
    if (!w.defined() || w.scalar_type() != dtype || !w.is_cpu()) return std::nullopt;

  std::vector<at::Tensor> result = stack(x, h, weights, std::nullopt, std::nullopt, spec);
  at::Tensor out = m.batch_first ? result[0].transpose(0, 1) : result[0];
  if (!batched) return std::make_tuple(out.squeeze(m.batch_first ? 0 : 1), result[1].squeeze(1));
  return std::make_tuple(out, result[1]);
}

std::optional<at::Tensor> cell_module_forward(const at::Tensor& input, const std::optional<at::Tensor>& hx,
                                              const at::Tensor& w_ih, const at::Tensor& w_hh,
                                              const std::optional<at::Tensor>& b_ih,
                                              const std::optional<at::Tensor>& b_hh, c10::string_view nonlinearity,
                                              int64_t input_size, int64_t hidden_size) {
  // The module's checks (modules.py, RNNCell.forward and _check_forward_args) as one test each.
  const int64_t dim = input.dim();
  if (!input.is_cpu() || !at::isFloatingType(input.scalar_type()) || (dim != 1 && dim != 2)) return std::nullopt;
  if (hx && hx->dim() != dim) return std::nullopt;  // a batched hx for unbatched input, or the reverse
  if (nonlinearity != "tanh" && nonlinearity != "relu") return std::nullopt;
  const bool batched = dim == 2;
  const at::Tensor x = batched ? input : input.unsqueeze(0);
  const int64_t batch = x.size(0);
  const at::ScalarType dtype = x.scalar_type();
  if (x.size(1) != input_size) return std::nullopt;
  const auto usual = [&](const at::Tensor& t, c10::IntArrayRef shape) {
    return t.defined() && t.sizes() == shape && t.scalar_type() == dtype && t.is_cpu();
  };
  if (!usual(w_ih, {hidden_size, input_size}) || !usual(w_hh, {hidden_size, hidden_size})) return std::nullopt;
  if (b_ih.has_value() != b_hh.has_value()) return std::nullopt;
  if (b_ih && !(usual(*b_ih, {hidden_size}) && usual(*b_hh, {hidden_size}))) return std::nullopt;
  at::Tensor h;
  if (hx) {
    h = batched ? *hx : hx->unsqueeze(0);
    if (!usual(h, {batch, hidden_size})) return std::nullopt;
  } else {
    h = at::zeros({batch, hidden_size}, x.options());
  }
  at::Tensor y = cell(x, h, w_ih, w_hh, b_ih, b_hh, nonlinearity);
  return batched ? y : y.squeeze(0);
}

// A node with a layer's inputs and outputs and no work, for benchmarks: what eager autograd
// itself costs an extension's call (graph, engine, gradient accumulation).
struct NoWork : torch::autograd::Function<NoWork> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, at::TensorList weights, int64_t hidden) {
    ctx->saved_data["x"] = x.sizes().vec();
    ctx->saved_data["weights"] = static_cast<int64_t>(weights.size());
    for (size_t i = 0; i < weights.size(); ++i) ctx->saved_data["w" + std::to_string(i)] = weights[i].sizes().vec();
    return {x.new_empty({x.size(0), x.size(1), hidden}), x.new_empty({1, x.size(1), hidden})};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list result{grads[0].new_empty(ctx->saved_data["x"].toIntVector())};
    for (int64_t i = 0; i < ctx->saved_data["weights"].toInt(); ++i)
      result.push_back(grads[0].new_empty(ctx->saved_data["w" + std::to_string(i)].toIntVector()));
    result.emplace_back();  // hidden
    return result;
  }
};

std::vector<at::Tensor> no_work(const at::Tensor& x, const std::vector<at::Tensor>& weights, int64_t hidden) {
  return NoWork::apply(x, at::TensorList(weights), hidden);
}

}  // namespace myrnn_fast::eager
