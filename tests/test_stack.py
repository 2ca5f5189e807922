"""The cpp backend's whole-RNN call (``_cpp.stack``: every layer and direction in one call to the
extension) against the module layer's own loop over the same kernels, and against torch.nn.

The two routes run the same C++ kernels in the same order, so they must agree exactly; torch.nn
must agree within the parity tolerances. The tests also check which route ran: the stack for eager
calls without dropout between layers, the per-layer loop where a mask is drawn between layers.
"""

import pytest
import torch
from torch.nn.utils.rnn import pack_sequence

import myrnn_fast
import myrnn_fast.config as config
from myrnn_fast import registry
from parity import assert_close, cell_pair, randn, rnn_pair


def _close(actual, expected, what="value"):
    assert_close(actual, expected, torch.float64, what)


pytestmark = pytest.mark.skipif("cpp" not in myrnn_fast.available_backends(), reason="the extension is not built")

CONFIGS = [(1, False), (2, False), (1, True), (3, True)]  # (num_layers, bidirectional)


@pytest.fixture
def calls(monkeypatch):
    """How often each of the cpp backend's whole-RNN entries ran an RNN: ``rnn_module_forward``
    (a module's usual call whole, dense input) and ``rnn_stack`` (packed input, and each layer
    where dropout runs layer by layer). Their backward runs inside the C++ node they record:
    `_recorded_by_the_stack` checks that one."""
    from myrnn_fast.backends import _cpp

    counts = {}

    def counted(entry, name):
        def run(*args):
            result = entry(*args)
            if result is not None:  # None: the module's Python path runs instead
                counts[name] = counts.get(name, 0) + 1
            return result

        return run

    monkeypatch.setattr(_cpp._C, "rnn_stack", counted(_cpp._C.rnn_stack, "rnn_stack"))
    monkeypatch.setattr(_cpp, "module_forward", counted(_cpp.module_forward, "rnn_module_forward"))
    return counts


def _inputs(ours, packed, batch=3):
    directions = 2 if ours.bidirectional else 1
    hx = randn(ours.num_layers * directions, batch, ours.hidden_size, seed=7)
    if packed:
        x = pack_sequence([randn(n, ours.input_size, seed=10 + n) for n in (5, 3, 2)][:batch])
    else:
        x = randn(5, batch, ours.input_size, seed=1)
    return x, hx


def _recorded_by_the_stack(*outputs):
    """Whether one C++ node of the whole-RNN call (ops/eager.cpp) is every output's grad_fn."""
    names = {o.grad_fn.name() for o in outputs}
    return names == {"torch::autograd::CppNode<myrnn_fast::eager::RnnStack>"}


def _leaves(x, hx, module):
    data = x.data if isinstance(x, torch.nn.utils.rnn.PackedSequence) else x
    return [data, hx, *module.parameters()]


def _per_layer(ours, x, hx):
    """The module's loop over layers, on the same backend: what the stack call replaces."""
    impl = registry.kernels(hx.device, ours.backend)
    weights = ours._flat_weights
    if isinstance(x, torch.nn.utils.rnn.PackedSequence):
        from myrnn_fast.modules import _reverse_index

        index = _reverse_index(x.batch_sizes) if ours.bidirectional else None
        out, h_n = ours._layers(impl, x.data, hx, x.batch_sizes, weights, index)
        return out, h_n
    return ours._layers(impl, x, hx, None, weights, None)


@pytest.mark.parametrize("path", ["tiles", "gemm"])
@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("layers,bidirectional", CONFIGS)
def test_stack_equals_the_per_layer_loop_and_torch_nn(calls, path, packed, bias, layers, bidirectional):
    ref, ours = rnn_pair("cpp", 4, 6, layers, bias=bias, bidirectional=bidirectional)
    x, hx = _inputs(ours, packed)
    with config.override(cpu_path=path):
        out, h_n = ours(x, hx)
        entry = {"rnn_stack": 1} if packed else {"rnn_module_forward": 1}
        assert calls == entry
        data = out.data if packed else out
        assert _recorded_by_the_stack(data, h_n)
        grad_out = torch.linspace(-1, 1, data.numel(), dtype=data.dtype).reshape(data.shape)
        grads = torch.autograd.grad((data, h_n), _leaves(x, hx, ours), (grad_out, h_n.detach().cos()))
        assert calls == entry

        loop_out, loop_h = _per_layer(ours, x, hx)
        loop_grads = torch.autograd.grad((loop_out, loop_h), _leaves(x, hx, ours), (grad_out, h_n.detach().cos()))
    assert torch.equal(data, loop_out) and torch.equal(h_n, loop_h)
    for a, b in zip(grads, loop_grads):
        assert torch.equal(a, b)

    ref_out, ref_h = ref(x, hx)
    ref_data = ref_out.data if packed else ref_out
    _close(data, ref_data)
    _close(h_n, ref_h)
    ref_grads = torch.autograd.grad((ref_data, ref_h), _leaves(x, hx, ref), (grad_out, h_n.detach().cos()))
    for a, b in zip(grads, ref_grads):
        _close(a, b)


@pytest.mark.parametrize("layers,bidirectional", CONFIGS)
def test_stack_without_grad(calls, layers, bidirectional):
    ref, ours = rnn_pair("cpp", 4, 6, layers, bidirectional=bidirectional)
    x, hx = _inputs(ours, packed=False)
    with torch.no_grad():
        out, h_n = ours(x)
        ref_out, ref_h = ref(x)
    assert calls == {"rnn_module_forward": 1}
    assert not out.requires_grad and not h_n.requires_grad
    _close(out, ref_out)
    _close(h_n, ref_h)


def test_stack_gradients_only_where_needed(calls):
    """grad_x is not computed (nor returned) for an input that needs none, and an unused output's
    gradient is that of zeros."""
    ref, ours = rnn_pair("cpp", 4, 6, 2, bidirectional=True)
    x = randn(5, 3, 4, seed=1, grad=False)
    h_n = ours(x)[1]
    assert _recorded_by_the_stack(h_n)
    grads = torch.autograd.grad(h_n.sum(), list(ours.parameters()))
    ref_grads = torch.autograd.grad(ref(x)[1].sum(), list(ref.parameters()))
    assert calls == {"rnn_module_forward": 1}
    for a, b in zip(grads, ref_grads):
        _close(a, b)


def test_dropout_between_layers_runs_layer_by_layer(calls):
    """Dropout masks are drawn between layers, as torch.nn draws them: that call stays per layer
    and gets torch.nn's masks for the same seed; in eval mode the stack runs again."""
    ref, ours = rnn_pair("cpp", 4, 6, 3, dropout=0.5)
    x = randn(5, 3, 4, seed=1)
    torch.manual_seed(3)
    out = ours(x)[0]
    torch.manual_seed(3)
    _close(out, ref(x)[0])
    assert calls == {"rnn_stack": 3}  # one call per layer, each a one-layer stack
    ours.eval()
    ref.eval()
    _close(ours(x)[0], ref(x)[0])
    assert calls == {"rnn_stack": 3, "rnn_module_forward": 1}


@pytest.mark.parametrize("layers,bidirectional", [(2, True)])
def test_stack_double_backward(layers, bidirectional):
    ref, ours = rnn_pair("cpp", 3, 4, layers, bidirectional=bidirectional)
    x = randn(4, 2, 3, seed=1)
    hx = randn(layers * 2, 2, 4, seed=2)

    def second_order(module):
        out, h_n = module(x, hx)
        loss = (out.sin().sum() + h_n.sum())
        first = torch.autograd.grad(loss, [x, hx, *module.parameters()], create_graph=True)
        return torch.autograd.grad(sum(g.square().sum() for g in first), [x, hx, *module.parameters()])

    for a, b in zip(second_order(ours), second_order(ref)):
        _close(a, b)


def test_stack_gradcheck():
    _, ours = rnn_pair("cpp", 2, 3, 2, bidirectional=True)
    x = randn(3, 2, 2, seed=1)
    hx = randn(4, 2, 3, seed=2)
    params = list(ours.parameters())

    def run(x, hx, *weights):
        out, h_n = torch.func.functional_call(ours, dict(zip([n for n, _ in ours.named_parameters()], weights)), (x, hx))
        return out, h_n

    assert torch.autograd.gradcheck(run, (x, hx, *[p.detach().requires_grad_() for p in params]))


def test_stack_refuses_a_malformed_call():
    from myrnn_fast import _C

    x, hx = randn(3, 2, 4, grad=False), randn(2, 2, 6, grad=False)
    weights = [randn(6, 4, grad=False), randn(6, 6, grad=False)]
    with pytest.raises(RuntimeError, match="take 4 weights, got 2"):
        _C.rnn_stack_forward(x, hx, weights, None, None, 2, False, False, "tanh", False)
    with pytest.raises(RuntimeError, match="hx must be"):
        _C.rnn_stack_forward(x, hx[:1], weights * 2, None, None, 2, False, False, "tanh", False)
    with pytest.raises(ValueError, match="num_layers"):
        _C.rnn_stack_forward(x, hx, [], None, None, 0, False, False, "tanh", False)
    with pytest.raises(RuntimeError, match="take 4 weights, got 2"):  # the differentiable entry too
        _C.rnn_stack(x.requires_grad_(), hx, weights, None, None, 2, False, False, "tanh")
    with pytest.raises(RuntimeError, match="stack_forward saved"):
        _C.rnn_stack_backward(None, None, x, hx, weights * 2, [], None, None, 2, False, False, "tanh", False)


def test_the_node_checks_its_saved_tensors_as_autograd_does():
    """The C++ node's saved tensors go through autograd's SavedVariable: a second backward, or a
    weight changed in place after the forward, is the error torch.nn gives; saved-tensor hooks
    (activation offloading, checkpointing) see what it saves."""
    _, ours = rnn_pair("cpp", 3, 4, 1)
    x = randn(5, 2, 3, seed=1)
    out = ours(x)[0]
    out.sum().backward()
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        out.sum().backward()
    out = ours(x)[0]
    with torch.no_grad():
        ours.weight_hh_l0.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()
    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t.clone(), lambda t: t):
        out = ours(x)[0]
    assert any(t is x for t in packed) and any(t is ours.weight_hh_l0 for t in packed)
    grad = torch.autograd.grad(out.sum(), x)[0]
    assert torch.equal(grad, torch.autograd.grad(ours(x)[0].sum(), x)[0])
