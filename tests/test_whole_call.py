"""The modules' whole-call entries: a backend's ``module_forward`` (``RNN.forward``'s usual call)
and ``cell_module_forward`` (``RNNCell.forward``'s), which the cpp backend has in C++
(``_C.rnn_module_forward``, ``_C.rnn_cell_module_forward``) and the numba backend in Python.

Each entry does the module's reshaping and checks itself, then takes the route the module's
Python path would take, so with the entry withheld the same call must give the same outputs and
gradients, bit for bit. Every call the entry does not run whole (anything the Python path must
answer with torch.nn's errors, or handles in a way of its own) comes back as None, never an
error of the entry's own, whatever the module's attributes were set to.
"""

import importlib

import pytest
import torch

import myrnn_fast
import myrnn_fast.config as config
from parity import cell_pair, randn, rnn_pair

BACKENDS = [
    pytest.param(name, marks=pytest.mark.skipif(name not in myrnn_fast.available_backends(),
                                                reason=f"the {name} backend is not available"))
    for name in ("cpp", "numba")
]


def _backend(name):
    return importlib.import_module(f"myrnn_fast.backends._{name}")


@pytest.fixture
def taken(monkeypatch, request):
    """The backend's two entries, counted: how often each ran a call whole (returned non-None)."""
    counts = {"module_forward": 0, "cell_module_forward": 0}
    backend = _backend(request.getfixturevalue("backend_name"))
    for name in counts:
        entry = getattr(backend, name)

        def counted(*args, entry=entry, name=name):
            result = entry(*args)
            counts[name] += result is not None
            return result

        monkeypatch.setattr(backend, name, counted)
    return counts


def _python_path(monkeypatch, module, *args, entry="module_forward"):
    """The module's call with its backend's whole-call entry withheld: its Python path."""
    with monkeypatch.context() as m:
        m.setattr(_backend(module.backend), entry, None)
        return module(*args)


# numba's entry runs one dense layer in one direction (fused kernels, or its `layer` past
# numba_fused_max_work, which 0 turns off); a deeper stack is declined, for the module's loop.
ROUTES = [("cpp", 1, False, None), ("cpp", 2, True, None),
          ("numba", 1, False, None), ("numba", 1, False, 0), ("numba", 2, True, None)]


@pytest.mark.parametrize("batch_first", [False, True], ids=["seq_first", "batch_first"])
@pytest.mark.parametrize("batched", [True, False], ids=["batched", "unbatched"])
@pytest.mark.parametrize("with_hx", [True, False], ids=["hx", "no_hx"])
@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
@pytest.mark.parametrize(
    "backend_name,layers,bidirectional,fused_max_work",
    [pytest.param(*route, marks=BACKENDS[route[0] == "numba"].marks) for route in ROUTES],
    ids=["cpp-1", "cpp-2-bidi", "numba-fused", "numba-layer", "numba-2-bidi"],
)
def test_whole_call_equals_the_python_path(monkeypatch, taken, backend_name, layers, bidirectional, fused_max_work,
                                           batch_first, batched, with_hx, grad):
    """RNN.forward's entry reshapes as the module's Python path does (batch_first, unbatched
    input, zeros for an absent hx): the same outputs and gradients, bit for bit."""
    _, ours = rnn_pair(backend_name, 3, 5, layers, bidirectional=bidirectional, batch_first=batch_first)
    states = layers * (2 if bidirectional else 1)
    x = randn(*(((2, 4, 3) if batch_first else (4, 2, 3)) if batched else (4, 3)), seed=1)  # B = 2, T = 4
    hx = randn(*((states, 2, 5) if batched else (states, 5)), seed=2) if with_hx else None
    args = (x, hx) if with_hx else (x,)
    knobs = {} if fused_max_work is None else {"numba_fused_max_work": fused_max_work}
    results = []
    with config.override(**knobs), torch.set_grad_enabled(grad):
        for run in (lambda: ours(*args), lambda: _python_path(monkeypatch, ours, *args)):
            out, h_n = run()
            grads = []
            if grad:
                leaves = [x] + ([hx] if with_hx else []) + list(ours.parameters())
                grads = torch.autograd.grad((out, h_n), leaves, (out.detach().cos(), h_n.detach().sin()))
            results.append((out, h_n, *grads))
    whole = backend_name == "cpp" or (layers == 1 and not bidirectional)
    assert taken == {"module_forward": int(whole), "cell_module_forward": 0}
    assert results[0][0].shape == results[1][0].shape and results[0][1].shape == results[1][1].shape
    assert len(results[0]) == (3 + len(list(ours.parameters())) + with_hx if grad else 2)
    for a, b in zip(*results):
        assert torch.equal(a, b)


def _declined(ours, x, hx=None):
    return _backend(ours.backend).module_forward(
        x, hx, ours._flat_weights, ours.num_layers, ours.bidirectional, ours.bias, ours.nonlinearity,
        ours.batch_first, ours.input_size, ours.hidden_size,
    ) is None


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_whole_call_declines_what_the_python_path_must_answer(backend_name):
    _, ours = rnn_pair(backend_name, 3, 5, 1)
    x, hx = randn(4, 2, 3, seed=1), randn(1, 2, 5, seed=2)
    assert not _declined(ours, x, hx) and not _declined(ours, x) and not _declined(ours, x[:, 0], hx[:, 0])
    assert _declined(ours, randn(4, 2, 4, seed=1))  # input size
    assert _declined(ours, randn(0, 2, 3, seed=1))  # no steps
    assert _declined(ours, randn(4, 3, seed=1), hx)  # unbatched input, batched hx
    assert _declined(ours, x, randn(1, 3, 5, seed=2))  # hx batch
    assert _declined(ours, x, randn(2, 2, 5, seed=2))  # hx layers
    assert _declined(ours, x, hx.float())  # hx dtype
    assert _declined(ours, x.float(), hx.float())  # input dtype against the weights'
    assert _declined(ours, randn(4, 2, 2, 3, seed=1))  # 4-D
    assert _declined(ours, x.to("meta"))  # not on the CPU
    assert _declined(ours, x.long())  # not floating
    assert _declined(ours, torch.complex(x, x))
    ours.nonlinearity = "gelu"
    assert _declined(ours, x, hx)


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_whole_call_declines_attributes_of_another_type(backend_name):
    """A module attribute set to another type (users may set anything) is declined, not an
    error of the entry's own (pybind11's TypeError for cpp): the Python path then answers it as
    torch.nn would."""
    _, ours = rnn_pair(backend_name, 3, 5, 1)
    x = randn(4, 2, 3, seed=1)
    for attribute, value in (("nonlinearity", None), ("num_layers", 1.0), ("batch_first", 0), ("bias", 1),
                             ("input_size", 3.0), ("hidden_size", None)):
        original = getattr(ours, attribute)
        setattr(ours, attribute, value)
        assert _declined(ours, x), (attribute, value)
        setattr(ours, attribute, original)
    assert not _declined(ours, x)
    ours.weight_hh_l0 = None
    assert _declined(ours, x)


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "unbatched"])
@pytest.mark.parametrize("with_hx", [True, False], ids=["hx", "no_hx"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
@pytest.mark.parametrize("backend_name,cell_gemm_min_work", [
    pytest.param("cpp", None, marks=BACKENDS[0].marks),
    pytest.param("numba", None, marks=BACKENDS[1].marks),
    pytest.param("numba", 0, marks=BACKENDS[1].marks),  # the step as torch GEMMs
], ids=["cpp", "numba-kernel", "numba-gemm"])
def test_whole_cell_call_equals_the_python_path(monkeypatch, taken, backend_name, cell_gemm_min_work, batched,
                                                with_hx, bias, grad):
    """RNNCell.forward's entry reshapes as the cell's Python path does (unbatched input, zeros
    for an absent hx): the same h' and gradients, bit for bit, and it is the route taken."""
    _, ours = cell_pair(backend_name, 3, 5, bias=bias)
    x = randn(*((2, 3) if batched else (3,)), seed=1)
    hx = randn(*((2, 5) if batched else (5,)), seed=2) if with_hx else None
    args = (x, hx) if with_hx else (x,)
    knobs = {} if cell_gemm_min_work is None else {"numba_cell_gemm_min_work": cell_gemm_min_work}
    results = []
    with config.override(**knobs), torch.set_grad_enabled(grad):
        for run in (lambda: ours(*args), lambda: _python_path(monkeypatch, ours, *args, entry="cell_module_forward")):
            h = run()
            leaves = [x] + ([hx] if with_hx else []) + list(ours.parameters())
            results.append((h, *(torch.autograd.grad(h, leaves, h.detach().cos()) if grad else ())))
    assert taken == {"module_forward": 0, "cell_module_forward": 1}
    assert results[0][0].shape == results[1][0].shape == ((2, 5) if batched else (5,))
    assert len(results[0]) == (1 + len(leaves) if grad else 1)
    for a, b in zip(*results):
        assert torch.equal(a, b)


def _cell_declined(ours, x, hx=None):
    return _backend(ours.backend).cell_module_forward(
        x, hx, ours.weight_ih, ours.weight_hh, ours.bias_ih, ours.bias_hh, ours.nonlinearity, ours.input_size,
        ours.hidden_size,
    ) is None


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_whole_cell_call_declines_what_the_python_path_must_answer(backend_name):
    _, ours = cell_pair(backend_name, 3, 5)
    x, hx = randn(2, 3, seed=1), randn(2, 5, seed=2)
    assert not _cell_declined(ours, x, hx) and not _cell_declined(ours, x) and not _cell_declined(ours, x[0], hx[0])
    assert _cell_declined(ours, randn(2, 4, seed=1), hx)  # input size
    assert _cell_declined(ours, x[0], hx)  # unbatched input, batched hx
    assert _cell_declined(ours, x, hx[0])  # and the reverse
    assert _cell_declined(ours, x, randn(3, 5, seed=2))  # hx batch
    assert _cell_declined(ours, x, randn(2, 4, seed=2))  # hx size
    assert _cell_declined(ours, x, hx.float())  # hx dtype
    assert _cell_declined(ours, x.float(), hx.float())  # input dtype against the weights'
    assert _cell_declined(ours, randn(1, 2, 3, seed=1))  # 3-D
    assert _cell_declined(ours, x.to("meta"))  # not on the CPU
    assert _cell_declined(ours, x.long())  # not floating
    assert _cell_declined(ours, torch.complex(x, x))
    for attribute, value in (("nonlinearity", "gelu"), ("nonlinearity", None), ("input_size", 3.0),
                             ("hidden_size", "5")):
        original = getattr(ours, attribute)
        setattr(ours, attribute, value)
        assert _cell_declined(ours, x, hx), (attribute, value)
        setattr(ours, attribute, original)
    with torch.no_grad():
        ours.bias_hh = None  # one bias without the other
    assert _cell_declined(ours, x, hx)
    ours.weight_hh = None
    assert _cell_declined(ours, x, hx)
