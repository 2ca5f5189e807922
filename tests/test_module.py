"""Drop-in surface: parameter names, shapes, initialization, state_dict both ways, attributes."""

import copy
import pickle

import pytest
import torch

import myrnn_fast

CONFIGS = [
    dict(input_size=3, hidden_size=5),
    dict(input_size=3, hidden_size=5, num_layers=3, bidirectional=True),
    dict(input_size=2, hidden_size=4, num_layers=2, bias=False, nonlinearity="relu", batch_first=True),
]


@pytest.mark.parametrize("kwargs", CONFIGS)
def test_same_parameters_and_initialization(kwargs):
    torch.manual_seed(7)
    ref = torch.nn.RNN(**kwargs)
    torch.manual_seed(7)
    ours = myrnn_fast.RNN(**kwargs)
    ref_params, our_params = dict(ref.named_parameters()), dict(ours.named_parameters())
    assert list(our_params) == list(ref_params)
    for name, p in ref_params.items():
        assert our_params[name].shape == p.shape, name
        assert torch.equal(our_params[name], p), name  # same draws from the same seed
    assert list(ours.state_dict()) == list(ref.state_dict())
    assert ours._flat_weights_names == ref._flat_weights_names
    assert [[p.shape for p in ps] for ps in ours.all_weights] == [[p.shape for p in ps] for ps in ref.all_weights]
    for attr in ("mode", "input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout",
                 "bidirectional", "proj_size", "nonlinearity"):
        assert getattr(ours, attr) == getattr(ref, attr), attr
    # Same repr, except that ours also names a non-default nonlinearity (torch's omits it).
    ours_repr = repr(ours).replace(", nonlinearity='relu'", "")
    assert ours_repr.split("(", 1)[1] == repr(ref).split("(", 1)[1]


@pytest.mark.parametrize("kwargs", CONFIGS)
def test_state_dict_moves_both_ways(kwargs):
    ref, ours = torch.nn.RNN(**kwargs), myrnn_fast.RNN(**kwargs)
    ours.load_state_dict(ref.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(ours.parameters(), ref.parameters()))
    ours2 = myrnn_fast.RNN(**kwargs)
    ref.load_state_dict(ours2.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(ours2.parameters(), ref.parameters()))


def test_cell_parameters_and_state_dict():
    torch.manual_seed(3)
    ref = torch.nn.RNNCell(3, 4, bias=False, nonlinearity="relu")
    torch.manual_seed(3)
    ours = myrnn_fast.RNNCell(3, 4, bias=False, nonlinearity="relu")
    assert list(ours.state_dict()) == list(ref.state_dict()) == ["weight_ih", "weight_hh"]
    assert ours.bias_ih is None and ours.bias_hh is None
    assert all(torch.equal(a, b) for a, b in zip(ours.parameters(), ref.parameters()))
    ref.load_state_dict(ours.state_dict())
    assert repr(ours).split("(", 1)[1] == repr(ref).split("(", 1)[1]


def test_device_and_dtype_arguments():
    rnn = myrnn_fast.RNN(2, 3, 2, device="cpu", dtype=torch.float64)
    assert all(p.dtype == torch.float64 and p.device.type == "cpu" for p in rnn.parameters())
    cell = myrnn_fast.RNNCell(2, 3, dtype=torch.float16)
    assert cell.weight_ih.dtype == torch.float16


def test_to_copy_pickle_and_backend_in_repr():
    rnn = myrnn_fast.RNN(2, 3, backend="reference")
    assert "backend='reference'" in repr(rnn)
    x = torch.randn(4, 1, 2, dtype=torch.float64)
    rnn = rnn.double()
    clone = copy.deepcopy(rnn)
    restored = pickle.loads(pickle.dumps(rnn))
    for other in (clone, restored):
        assert other.backend == "reference"
        torch.testing.assert_close(other(x)[0], rnn(x)[0])
    rnn.flatten_parameters()  # no-op kept for code written against torch.nn.RNN


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_runs_like_torch(backend, dtype):
    torch.manual_seed(0)
    ref = torch.nn.RNN(3, 4, 2).to(dtype)
    ours = myrnn_fast.RNN(3, 4, 2, backend=backend).to(dtype)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(5, 2, 3).to(dtype)
    (a, ha), (b, hb) = ours(x), ref(x)
    assert a.dtype == dtype and ha.dtype == dtype
    torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(ha.float(), hb.float(), rtol=2e-2, atol=2e-2)


def test_weights_replaced_after_construction_are_used(backend):
    # torch.func.functional_call and plain reassignment must both reach the kernels.
    rnn = myrnn_fast.RNN(2, 3, backend=backend)
    x = torch.randn(4, 1, 2)
    zero = {name: torch.zeros_like(p) for name, p in rnn.named_parameters()}
    out, h = torch.func.functional_call(rnn, zero, (x,))
    assert torch.all(out == 0) and torch.all(h == 0)
    rnn.weight_ih_l0 = torch.nn.Parameter(torch.zeros(3, 2))
    rnn.weight_hh_l0 = torch.nn.Parameter(torch.zeros(3, 3))
    with torch.no_grad():
        rnn.bias_ih_l0.fill_(0.25)
        rnn.bias_hh_l0.fill_(0.0)
    out, _ = rnn(x)
    torch.testing.assert_close(out, torch.full_like(out, torch.tanh(torch.tensor(0.25)).item()))
