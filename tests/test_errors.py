"""Bad arguments and inputs: wherever torch.nn raises, we raise the same kind of exception with a
message that names the problem; wherever torch.nn succeeds, so do we, with the same result."""

import warnings

import pytest
import torch
from torch.nn.utils.rnn import pack_sequence

import myrnn_fast
from parity import assert_close, cell_pair, rnn_pair


def _outcome(fn):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fn(), None
    except Exception as exc:  # noqa: BLE001 - recording whatever torch raises is the point
        return None, exc


def _same_outcome(make_ref, make_ours):
    ref_result, ref_exc = _outcome(make_ref)
    our_result, our_exc = _outcome(make_ours)
    if ref_exc is not None:
        assert our_exc is not None, f"torch.nn raised {type(ref_exc).__name__}: {ref_exc}; we did not"
        assert isinstance(our_exc, type(ref_exc)), (
            f"torch.nn raised {type(ref_exc).__name__}: {ref_exc}; we raised {type(our_exc).__name__}: {our_exc}"
        )
        assert str(our_exc), "the message must name the problem"
    else:
        assert our_exc is None, f"torch.nn succeeded; we raised {type(our_exc).__name__}: {our_exc}"
    return ref_result, our_result


CONSTRUCTOR_CASES = {
    "bias not bool": dict(input_size=3, hidden_size=4, bias=1),
    "batch_first not bool": dict(input_size=3, hidden_size=4, batch_first="yes"),
    "input_size float": dict(input_size=3.0, hidden_size=4),
    "input_size zero": dict(input_size=0, hidden_size=4),
    "hidden_size negative": dict(input_size=3, hidden_size=-1),
    "hidden_size str": dict(input_size=3, hidden_size="4"),
    "num_layers zero": dict(input_size=3, hidden_size=4, num_layers=0),
    "num_layers float": dict(input_size=3, hidden_size=4, num_layers=2.0),
    "dropout above one": dict(input_size=3, hidden_size=4, num_layers=2, dropout=1.5),
    "dropout bool": dict(input_size=3, hidden_size=4, num_layers=2, dropout=True),
    "dropout str": dict(input_size=3, hidden_size=4, num_layers=2, dropout="0.1"),
    "unknown nonlinearity": dict(input_size=3, hidden_size=4, nonlinearity="sigmoid"),
    "proj_size": dict(input_size=3, hidden_size=4, proj_size=2),
    "unknown keyword": dict(input_size=3, hidden_size=4, projection=2),
    "valid, with dropout on one layer": dict(input_size=3, hidden_size=4, dropout=0.5),
}


@pytest.mark.parametrize("kwargs", CONSTRUCTOR_CASES.values(), ids=CONSTRUCTOR_CASES.keys())
def test_rnn_constructor(kwargs):
    _same_outcome(lambda: torch.nn.RNN(**kwargs), lambda: myrnn_fast.RNN(**kwargs))


CELL_CONSTRUCTOR_CASES = {
    "input_size float": dict(input_size=3.0, hidden_size=4),
    "hidden_size negative": dict(input_size=3, hidden_size=-1),
    "bias int (torch accepts it)": dict(input_size=3, hidden_size=4, bias=1),
    "unknown nonlinearity (torch fails only when called)": dict(input_size=3, hidden_size=4, nonlinearity="gelu"),
}


@pytest.mark.parametrize("kwargs", CELL_CONSTRUCTOR_CASES.values(), ids=CELL_CONSTRUCTOR_CASES.keys())
def test_cell_constructor(kwargs):
    _same_outcome(lambda: torch.nn.RNNCell(**kwargs), lambda: myrnn_fast.RNNCell(**kwargs))


def _x(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


# (constructor kwargs, input, hx); I=3, H=4 unless a case says otherwise.
RNN_INPUT_CASES = {
    "1-D input": ({}, _x(5), None),
    "4-D input": ({}, _x(5, 2, 3, 1), None),
    "wrong feature size": ({}, _x(5, 2, 4), None),
    "integer input": ({}, torch.ones(5, 2, 3, dtype=torch.long), None),
    "float64 input, float32 weights": ({}, _x(5, 2, 3, dtype=torch.float64), None),
    "float64 hx, float32 input": ({}, _x(5, 2, 3), _x(1, 2, 4, dtype=torch.float64)),
    "integer hx": ({}, _x(5, 2, 3), torch.ones(1, 2, 4, dtype=torch.long)),
    "hx of wrong batch": ({}, _x(5, 2, 3), _x(1, 3, 4)),
    "hx of wrong layers": ({"num_layers": 2}, _x(5, 2, 3), _x(1, 2, 4)),
    "hx of wrong hidden size": ({}, _x(5, 2, 3), _x(1, 2, 5)),
    "hx missing directions": ({"bidirectional": True}, _x(5, 2, 3), _x(1, 2, 4)),
    "2-D hx for batched input": ({}, _x(5, 2, 3), _x(2, 4)),
    "3-D hx for unbatched input": ({}, _x(5, 3), _x(1, 1, 4)),
    "empty sequence": ({}, _x(0, 2, 3), None),
    "empty sequence, batch_first": ({"batch_first": True}, _x(2, 0, 3), None),
    "empty batch": ({}, _x(5, 0, 3), None),
    "empty batch with hx": ({"num_layers": 2}, _x(5, 0, 3), _x(2, 0, 4)),
    "hx on another device": ({}, _x(5, 2, 3), torch.zeros(1, 2, 4, device="meta")),
    "input on another device": ({}, torch.zeros(5, 2, 3, device="meta"), None),
    "input is a list": ({}, [[1.0, 2.0, 3.0]], None),
    "hx is a list": ({}, _x(5, 2, 3), [[0.0] * 4]),
    "bidirectional given as int": ({"bidirectional": 1}, _x(5, 2, 3), None),
    "bool input": ({}, torch.ones(5, 2, 3, dtype=torch.bool), None),
    "empty unbatched sequence": ({}, _x(0, 3), None),
    "empty unbatched sequence with hx": ({}, _x(0, 3), _x(1, 4)),
    "hx with empty layer dimension": ({}, _x(5, 2, 3), _x(0, 2, 4)),
}


def _same_call(ref, ours, x, hx):
    """Call both modules on the same (possibly bad) input: same exception kind, or same result."""
    ref_result, our_result = _same_outcome(lambda: ref(x, hx), lambda: ours(x, hx))
    if ref_result is not None:
        single = isinstance(ref_result, torch.Tensor)
        for a, b in zip(*(((r,) if single else r) for r in (our_result, ref_result))):
            assert a.shape == b.shape
            assert_close(a, b, torch.float32, "result")


@pytest.mark.parametrize("case", RNN_INPUT_CASES.values(), ids=RNN_INPUT_CASES.keys())
def test_rnn_input(backend, case):
    kwargs, x, hx = case
    _same_call(*rnn_pair(backend, 3, 4, dtype=torch.float32, **kwargs), x, hx)


def _replace(module, name, value):
    setattr(module, name, torch.nn.Parameter(value, requires_grad=value.is_floating_point()))


# Parameters changed after construction, the same way on both modules: name -> tensor(original).
RNN_WEIGHT_CASES = {
    "float64 weight_hh": ("weight_hh_l0", lambda w: w.double()),
    "float64 bias_hh": ("bias_hh_l0", lambda w: w.double()),
    "float16 weight_ih (the one the dtype check reads)": ("weight_ih_l0", lambda w: w.half()),
    "integer weight_hh": ("weight_hh_l0", lambda w: w.long()),
    "weight_hh on another device": ("weight_hh_l0", lambda w: w.to("meta")),
    "bias_ih on another device": ("bias_ih_l0", lambda w: w.to("meta")),
    "weight_hh of wrong shape": ("weight_hh_l0", lambda w: torch.zeros(4, 5)),
    "weight_ih of wrong hidden size": ("weight_ih_l0", lambda w: torch.zeros(5, 3)),
    "bias_hh of wrong size": ("bias_hh_l0", lambda w: torch.zeros(5)),
    "second layer weight_ih of wrong input size": ("weight_ih_l1", lambda w: torch.zeros(4, 3)),
    "non-contiguous weight_hh (valid)": ("weight_hh_l0", lambda w: w.t().contiguous().t()),
}


@pytest.mark.parametrize("case", RNN_WEIGHT_CASES)
def test_rnn_weights(backend, case):
    name, change = RNN_WEIGHT_CASES[case]
    ref, ours = rnn_pair(backend, 3, 4, num_layers=2, dtype=torch.float32)
    value = change(getattr(ref, name).detach())
    _replace(ref, name, value)
    _replace(ours, name, value.clone())
    _same_call(ref, ours, _x(5, 2, 3), None)


CELL_WEIGHT_CASES = {
    "float64 weight_hh": ("weight_hh", lambda w: w.double()),
    "float64 bias_ih": ("bias_ih", lambda w: w.double()),
    "integer weight_hh": ("weight_hh", lambda w: w.long()),
    "weight_hh of wrong shape": ("weight_hh", lambda w: torch.zeros(4, 5)),
    "weight_ih of wrong hidden size": ("weight_ih", lambda w: torch.zeros(5, 3)),
    "bias_hh of wrong size": ("bias_hh", lambda w: torch.zeros(5)),
    "non-contiguous weight_ih (valid)": ("weight_ih", lambda w: w.t().contiguous().t()),
}


@pytest.mark.parametrize("case", CELL_WEIGHT_CASES)
def test_cell_weights(backend, case):
    name, change = CELL_WEIGHT_CASES[case]
    ref, ours = cell_pair(backend, 3, 4, dtype=torch.float32)
    value = change(getattr(ref, name).detach())
    _replace(ref, name, value)
    _replace(ours, name, value.clone())
    _same_call(ref, ours, _x(2, 3), _x(2, 4))


def test_packed_hx_of_wrong_batch(backend):
    ref, ours = rnn_pair(backend, 3, 4, dtype=torch.float32)
    packed = pack_sequence([_x(3, 3), _x(2, 3)])
    # torch.nn selects hx rows by sorted_indices before checking, so a larger hx batch passes.
    for hx in (_x(1, 3, 4), _x(2, 2, 4), _x(1, 2, 5)):
        ref_result, our_result = _same_outcome(lambda: ref(packed, hx), lambda: ours(packed, hx))
        if ref_result is not None:
            assert_close(our_result[0].data, ref_result[0].data, torch.float32, "output")
            assert_close(our_result[1], ref_result[1], torch.float32, "h_n")
    bad = torch.nn.utils.rnn.PackedSequence(_x(5, 3, 1), packed.batch_sizes)
    _same_outcome(lambda: ref(bad), lambda: ours(bad))


CELL_INPUT_CASES = {
    "3-D input": ({}, _x(1, 2, 3), None),
    "0-D input": ({}, torch.tensor(1.0), None),
    "3-D hx": ({}, _x(2, 3), _x(1, 2, 4)),
    "wrong feature size": ({}, _x(2, 5), None),
    "hx of wrong batch": ({}, _x(2, 3), _x(3, 4)),
    "hx of wrong hidden size": ({}, _x(2, 3), _x(2, 5)),
    "unbatched input, batched hx": ({}, _x(3), _x(1, 4)),
    "batched input, unbatched hx": ({}, _x(1, 3), _x(4)),
    "integer input": ({}, torch.ones(2, 3, dtype=torch.long), None),
    "float64 input": ({}, _x(2, 3, dtype=torch.float64), None),
    "float64 hx": ({}, _x(2, 3), _x(2, 4, dtype=torch.float64)),
    "empty batch": ({}, _x(0, 3), None),
    "unknown nonlinearity": ({"nonlinearity": "gelu"}, _x(2, 3), None),
    "input on another device": ({}, torch.zeros(2, 3, device="meta"), None),
    "input is a list": ({}, [1.0, 2.0, 3.0], None),
}


@pytest.mark.parametrize("case", CELL_INPUT_CASES.values(), ids=CELL_INPUT_CASES.keys())
def test_cell_input(backend, case):
    kwargs, x, hx = case
    _same_call(*cell_pair(backend, 3, 4, dtype=torch.float32, **kwargs), x, hx)


def test_messages_name_the_problem():
    rnn = myrnn_fast.RNN(3, 4)
    with pytest.raises(RuntimeError, match="input_size"):
        rnn(_x(5, 2, 4))
    with pytest.raises(RuntimeError, match=r"Expected hidden size \(1, 2, 4\)"):
        rnn(_x(5, 2, 3), _x(1, 3, 4))
    with pytest.raises(ValueError, match="dtype"):
        rnn(torch.ones(5, 2, 3, dtype=torch.long))
    with pytest.raises(RuntimeError, match="hx dtype"):
        rnn(_x(5, 2, 3), _x(1, 2, 4, dtype=torch.float64))
    with pytest.raises(TypeError, match="input must be a Tensor"):
        rnn("not a tensor")


@pytest.mark.parametrize("where", ["input", "hx"])
def test_cell_device_mismatch_names_the_device(backend, where):
    # The words test_odd_inputs.py expects of the CUDA case (meta stands in for the GPU here).
    cell = myrnn_fast.RNNCell(3, 4, backend=backend)
    x, hx = _x(2, 3), _x(2, 4)
    if where == "input":
        x = x.to("meta")
    else:
        hx = hx.to("meta")
    with pytest.raises(RuntimeError, match="device"):
        cell(x, hx)
