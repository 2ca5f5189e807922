"""Every backend against torch.nn.RNN with the same weights: outputs, h_n, and the gradients of
the input, h0 and every parameter, in float32 and float64."""

import itertools

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pack_sequence

import myrnn_fast

from parity import assert_close, check_module, rnn_pair

DTYPES = [torch.float32, torch.float64]
I, H = 3, 4  # tiny: the reference backend loops over every row of every step in Python


def dense_inputs(T, B, layers, directions, dtype, batch_first=False, with_hx=True, seed=1):
    def make():
        g = torch.Generator().manual_seed(seed)
        shape = (B, T, I) if batch_first else (T, B, I)
        x = torch.randn(shape, generator=g, dtype=dtype).requires_grad_()
        if not with_hx:
            return (x,), [x]
        hx = torch.randn(layers * directions, B, H, generator=g, dtype=dtype).requires_grad_()
        return (x, hx), [x, hx]

    return make


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "layers,bidirectional,batch_first,nonlinearity,bias",
    list(itertools.product([1, 2, 3], [False, True], [False, True], ["tanh", "relu"], [True, False])),
)
def test_dense(backend, dtype, layers, bidirectional, batch_first, nonlinearity, bias):
    ref, ours = rnn_pair(
        backend, I, H, layers, nonlinearity=nonlinearity, bias=bias,
        batch_first=batch_first, bidirectional=bidirectional, dtype=dtype,
    )
    directions = 2 if bidirectional else 1
    check_module(ref, ours, dense_inputs(3, 2, layers, directions, dtype, batch_first), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T,B", [(1, 1), (1, 3), (4, 1), (5, 3), (3, 0)])
@pytest.mark.parametrize("with_hx", [True, False])
def test_edge_shapes(backend, dtype, T, B, with_hx):
    ref, ours = rnn_pair(backend, I, H, 2, bidirectional=True, dtype=dtype)
    check_module(ref, ours, dense_inputs(T, B, 2, 2, dtype, with_hx=with_hx), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("with_hx", [True, False])
def test_unbatched(backend, dtype, batch_first, with_hx):
    ref, ours = rnn_pair(backend, I, H, 2, bidirectional=True, batch_first=batch_first, dtype=dtype)

    def make():
        g = torch.Generator().manual_seed(2)
        x = torch.randn(4, I, generator=g, dtype=dtype).requires_grad_()
        if not with_hx:
            return (x,), [x]
        hx = torch.randn(4, H, generator=g, dtype=dtype).requires_grad_()
        return (x, hx), [x, hx]

    out, h_n = check_module(ref, ours, make, dtype)
    assert out.shape == (4, 2 * H) and h_n.shape == (4, H)


def packed_inputs(lengths, layers, directions, dtype, enforce_sorted, with_hx=True, via_padding=False):
    def make():
        g = torch.Generator().manual_seed(3)
        seqs = [torch.randn(n, I, generator=g, dtype=dtype).requires_grad_() for n in lengths]
        if via_padding:
            padded = torch.nn.utils.rnn.pad_sequence(seqs)
            packed = pack_padded_sequence(padded, torch.tensor(lengths), enforce_sorted=enforce_sorted)
        else:
            packed = pack_sequence(seqs, enforce_sorted=enforce_sorted)
        if not with_hx:
            return (packed,), seqs
        hx = torch.randn(layers * directions, len(lengths), H, generator=g, dtype=dtype).requires_grad_()
        return (packed, hx), [*seqs, hx]

    return make


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "lengths,enforce_sorted",
    [([5, 3, 3, 1], True), ([2, 5, 1, 4], False), ([3], True), ([1, 1, 1], False), ([2, 4, 4], False)],
)
@pytest.mark.parametrize("layers,bidirectional", [(1, False), (1, True), (2, True)])
@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
def test_packed(backend, dtype, lengths, enforce_sorted, layers, bidirectional, nonlinearity):
    ref, ours = rnn_pair(backend, I, H, layers, nonlinearity=nonlinearity, bidirectional=bidirectional, dtype=dtype)
    directions = 2 if bidirectional else 1
    check_module(ref, ours, packed_inputs(lengths, layers, directions, dtype, enforce_sorted), dtype)


@pytest.mark.parametrize("with_hx", [True, False])
def test_packed_from_padding_without_bias(backend, with_hx):
    ref, ours = rnn_pair(backend, I, H, 2, bias=False, bidirectional=True)
    make = packed_inputs([2, 4, 3], 2, 2, torch.float64, False, with_hx=with_hx, via_padding=True)
    check_module(ref, ours, make, torch.float64)


def test_dropout_is_identity_in_eval_mode(backend):
    ref, ours = rnn_pair(backend, I, H, 3, dropout=0.7)
    ref.eval()
    ours.eval()
    check_module(ref, ours, dense_inputs(4, 2, 3, 1, torch.float64), torch.float64)


@pytest.mark.parametrize("packed", [False, True])
def test_dropout_train_mode_matches_torch_for_the_same_seed(backend, packed):
    # Dropout is drawn once per layer output from torch's generator, as torch.nn.RNN does, so the
    # same seed gives the same masks.
    ref, ours = rnn_pair(backend, I, H, 3, dropout=0.5, bidirectional=True)
    make = packed_inputs([4, 2, 3], 3, 2, torch.float64, False) if packed else dense_inputs(4, 2, 3, 2, torch.float64)

    def seeded_call(module, inputs):
        torch.manual_seed(1234)
        return module(*inputs)

    check_module(ref, ours, make, torch.float64, call=seeded_call)


def test_dropout_mask_statistics(backend):
    # Layer 0 outputs relu(1) = 1 everywhere; layer 1 passes its input through unchanged, so the
    # final output is the dropout mask itself: 0 with probability p, 1 / (1 - p) otherwise.
    p, steps, batch, hidden = 0.3, 6, 50, 16
    rnn = myrnn_fast.RNN(1, hidden, 2, nonlinearity="relu", dropout=p, backend=backend)
    with torch.no_grad():
        for name, param in rnn.named_parameters():
            param.zero_()
        rnn.bias_ih_l0.fill_(1.0)
        rnn.weight_ih_l1.copy_(torch.eye(hidden))
    x = torch.zeros(steps, batch, 1)
    torch.manual_seed(0)
    out, _ = rnn(x)
    kept = torch.isclose(out, torch.tensor(1 / (1 - p)))
    assert torch.all((out == 0) | kept)
    dropped = (out == 0).double().mean().item()
    n = out.numel()
    assert abs(dropped - p) < 4 * (p * (1 - p) / n) ** 0.5, dropped
    torch.manual_seed(1)
    assert not torch.equal(rnn(x)[0], out)  # a new draw per call
    rnn.eval()
    assert torch.all(rnn(x)[0] == 1)


def test_strided_inputs_hx_and_weights(backend):
    # Views with gaps, stride-0 broadcasts and transposed weight layouts reach the kernels as-is.
    ref, ours = rnn_pair(backend, I, H, 2, bidirectional=True, batch_first=True)
    weight = torch.randn(2 * H, H, dtype=torch.float64)[::2]
    with torch.no_grad():
        ref.weight_hh_l0.copy_(weight)
    ours.weight_hh_l0 = torch.nn.Parameter(weight.t().contiguous().t())
    assert not ours.weight_hh_l0.is_contiguous()

    def make():
        g = torch.Generator().manual_seed(6)
        base = torch.randn(5, 8, 2, I, generator=g, dtype=torch.float64)
        x = base.requires_grad_()
        hx = torch.randn(4, 10, H, generator=g, dtype=torch.float64).requires_grad_()
        return (x[:, ::2, 0, :], hx[:, ::2]), [x, hx]

    check_module(ref, ours, make, torch.float64)
    broadcast = torch.randn(1, 1, I, dtype=torch.float64).expand(5, 3, I)
    assert_close(ours(broadcast)[0], ref(broadcast)[0], torch.float64, "broadcast input")


def test_nan_and_inf_propagate_as_in_torch(backend):
    ref, ours = rnn_pair(backend, I, H, 2)
    x = torch.full((4, 2, I), 1e30, dtype=torch.float64)
    x[0, 0, 0], x[1, 1, 1] = float("inf"), float("nan")
    (a, ha), (b, hb) = ours(x), ref(x)
    assert torch.equal(a.isnan(), b.isnan()) and torch.equal(ha.isnan(), hb.isnan())
    assert_close(a.nan_to_num(), b.nan_to_num(), torch.float64, "saturated output")
