"""torch.autograd.gradcheck in float64 for every backend: the kernel contract itself and the
module around it (layers, directions, packing)."""

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck
from torch.nn.utils.rnn import pack_sequence

import myrnn_fast
from myrnn_fast import registry


def _randn(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_()


@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batch_sizes", [None, [3, 3, 2, 1]], ids=["dense", "packed"])
def test_layer_contract(backend, nonlinearity, bias, batch_sizes):
    impl = registry.implementation(backend)
    I, H, B = 2, 3, 3
    if batch_sizes is None:
        x = _randn(4, B, I, seed=1)
        sizes = None
    else:
        x = _randn(sum(batch_sizes), I, seed=1)
        sizes = torch.tensor(batch_sizes)
    h0 = _randn(B, H, seed=2)
    w_ih, w_hh = _randn(H, I, seed=3), _randn(H, H, seed=4)
    # relu has a kink at 0: keep pre-activations away from it so finite differences are valid.
    b_ih = (_randn(H, seed=5).detach() + 0.5).requires_grad_() if bias else None
    b_hh = _randn(H, seed=6) if bias else None

    def fn(x, h0, w_ih, w_hh, *b):
        b_ih, b_hh = b if b else (None, None)
        return impl.layer(x, h0, w_ih, w_hh, b_ih, b_hh, nonlinearity, sizes)

    inputs = (x, h0, w_ih, w_hh) + ((b_ih, b_hh) if bias else ())
    assert gradcheck(fn, inputs)


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("packed", [False, True])
def test_module(backend, bidirectional, packed):
    torch.manual_seed(0)
    rnn = myrnn_fast.RNN(2, 3, 2, bidirectional=bidirectional, dtype=torch.float64, backend=backend)
    params = list(rnn.parameters())
    directions = 2 if bidirectional else 1
    hx = _randn(2 * directions, 3, 3, seed=7)
    if packed:
        seqs = [_randn(n, 2, seed=10 + n) for n in (2, 4, 1)]

        def fn(hx, *tensors):
            out, h_n = torch.func.functional_call(
                rnn, dict(zip([n for n, _ in rnn.named_parameters()], tensors[3:])),
                (pack_sequence(list(tensors[:3]), enforce_sorted=False), hx),
            )
            return out.data, h_n

        assert gradcheck(fn, (hx, *seqs, *params))
    else:
        x = _randn(3, 3, 2, seed=8)

        def fn(x, hx, *tensors):
            return torch.func.functional_call(
                rnn, dict(zip([n for n, _ in rnn.named_parameters()], tensors)), (x, hx)
            )

        assert gradcheck(fn, (x, hx, *params))


def test_cell(backend):
    torch.manual_seed(0)
    cell = myrnn_fast.RNNCell(2, 3, dtype=torch.float64, backend=backend)
    names = [n for n, _ in cell.named_parameters()]

    def fn(x, h, *tensors):
        return torch.func.functional_call(cell, dict(zip(names, tensors)), (x, h))

    assert gradcheck(fn, (_randn(4, 2, seed=1), _randn(4, 3, seed=2), *cell.parameters()))


def test_double_backward(backend):
    torch.manual_seed(0)
    rnn = myrnn_fast.RNN(2, 3, 1, dtype=torch.float64, backend=backend)
    x, hx = _randn(3, 2, 2, seed=1), _randn(1, 2, 3, seed=2)
    assert gradgradcheck(lambda x, hx, w: torch.func.functional_call(rnn, {"weight_hh_l0": w}, (x, hx), strict=False), (x, hx, rnn.weight_hh_l0))
