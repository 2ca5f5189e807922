"""Odd but valid input, every backend against torch.nn.RNN / RNNCell with the same weights: low
precision and complex dtypes, meta tensors, NaN/Inf in values and gradients, saturating and
overflowing values, very long sequences, gradients through hx (or x, or the weights) alone,
double backward, and the empty batch of a cell."""

import pytest
import torch
from torch.nn.utils.rnn import pack_sequence

from myrnn_fast import registry
from parity import assert_close, cell_pair, check_module, rnn_pair

def _randn(*shape, dtype=torch.float64, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype)


def _run(module, x, hx=None, leaves=None):
    """Forward, then the gradients of a fixed loss w.r.t. ``leaves`` (default: x, hx and every
    parameter). Returns ``(outputs, grads)``."""
    out = module(x) if hx is None else module(x, hx)
    outs = out if isinstance(out, tuple) else (out,)
    outs = [o.data if isinstance(o, torch.nn.utils.rnn.PackedSequence) else o for o in outs]
    if leaves is None:
        leaves = [t for t in (x, hx) if t is not None and t.requires_grad] + list(module.parameters())
    loss = sum((o * torch.linspace(-1, 1, o.numel(), dtype=o.dtype).reshape(o.shape)).sum() for o in outs)
    if loss.is_complex():
        loss = loss.real + loss.imag
    return outs, torch.autograd.grad(loss, leaves)


def _same_special_values(actual, expected, what, rtol, atol):
    """NaN and ±Inf in the same places, the finite values close relative to the largest of them.

    With weights scaled up, a gradient entry can be a sum of products near 1e13 that cancels to
    1e9: its rounding error is relative to the products, not to what is left, and it moves with
    the BLAS's summation order (MKL sums differently on AMD and Intel CPUs). So the tolerance is
    normwise: rtol of the tensor's largest finite magnitude."""
    assert torch.equal(actual.isnan(), expected.isnan()), f"{what}: NaN positions differ"
    assert torch.equal(actual.isinf(), expected.isinf()), f"{what}: Inf positions differ"
    inf = expected.isinf()
    assert torch.equal(actual[inf], expected[inf]), f"{what}: Inf signs differ"
    finite = expected.isfinite()
    a, e = actual[finite], expected[finite]
    scale = e.abs().max().item() if e.numel() else 0.0
    torch.testing.assert_close(a, e, rtol=rtol, atol=max(atol, rtol * scale), msg=lambda m: f"{what}: {m}")


# ---------------------------------------------------------------------------------------------
# dtypes beyond float32/float64 that torch.nn.RNN accepts on the CPU


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_low_precision(backend, dtype):
    ref, ours = rnn_pair(backend, 3, 4, 2, bidirectional=True, dtype=dtype)
    x = _randn(5, 2, 3, dtype=dtype).requires_grad_()
    hx = _randn(4, 2, 4, dtype=dtype, seed=1).requires_grad_()
    (a_out, a_h), a_grads = _run(ours, x, hx)
    (b_out, b_h), b_grads = _run(ref, x, hx)
    assert a_out.dtype == dtype and a_h.dtype == dtype
    # Rounding differs with the order of operations; allow a few ulps of the largest value.
    eps = torch.finfo(dtype).eps
    for name, a, b in [("output", a_out, b_out), ("h_n", a_h, b_h), *zip(["x", "hx", "params"], a_grads, b_grads)]:
        bound = 32 * eps * (1 + b.abs().max().item())
        assert (a.double() - b.double()).abs().max().item() <= bound, name


def test_low_precision_cell(backend):
    ref, ours = cell_pair(backend, 3, 4, dtype=torch.bfloat16)
    x, hx = _randn(2, 3, dtype=torch.bfloat16), _randn(2, 4, dtype=torch.bfloat16, seed=1)
    a, b = ours(x, hx), ref(x, hx)
    assert a.dtype == torch.bfloat16
    torch.testing.assert_close(a, b, rtol=0.02, atol=0.02)


def test_complex(backend):
    ref, ours = rnn_pair(backend, 3, 4, 2, dtype=torch.complex128)
    x = (0.3 * torch.randn(5, 2, 3, dtype=torch.complex128, generator=torch.Generator().manual_seed(0))).requires_grad_()
    (a_out, a_h), a_grads = _run(ours, x)
    (b_out, b_h), b_grads = _run(ref, x)
    for name, a, b in [("output", a_out, b_out), ("h_n", a_h, b_h), *zip(["x", "params"], a_grads, b_grads)]:
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=lambda m: f"{name}: {m}")


# ---------------------------------------------------------------------------------------------
# Devices: a module and input wholly on `meta` (shape inference); CPU-vs-meta mismatches are
# error cases in test_errors.py, CPU-vs-CUDA ones below.


def test_everything_on_meta(backend):
    ref, ours = rnn_pair(backend, 3, 4, 2, bidirectional=True, dtype=torch.float32)
    ref, ours = ref.to("meta"), ours.to("meta")
    x = torch.empty(5, 2, 3, device="meta")
    expected = ref(x)
    if not registry._runs_on(backend, "meta"):
        with pytest.raises(registry.BackendUnavailableError, match="meta"):
            ours(x)
        return
    out, h_n = ours(x)
    assert out.device.type == "meta" and out.shape == expected[0].shape
    assert h_n.device.type == "meta" and h_n.shape == expected[1].shape


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("where", ["hx", "input", "weight"])
def test_cuda_device_mismatch(backend, where):
    ref, ours = rnn_pair(backend, 3, 4, dtype=torch.float32)
    x, hx = torch.randn(5, 2, 3), torch.zeros(1, 2, 4)
    if where == "hx":
        hx = hx.cuda()
    elif where == "input":
        x = x.cuda()
    else:
        ref.weight_hh_l0.data = ref.weight_hh_l0.data.cuda()
        ours.weight_hh_l0.data = ours.weight_hh_l0.data.cuda()
    with pytest.raises(RuntimeError) as ref_exc:
        ref(x, hx)
    with pytest.raises(type(ref_exc.value), match="device"):
        ours(x, hx)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_cell_device_mismatch(backend):
    ref, ours = cell_pair(backend, 3, 4, dtype=torch.float32)
    x, hx = torch.randn(2, 3), torch.zeros(2, 4, device="cuda")
    with pytest.raises(RuntimeError) as ref_exc:
        ref(x, hx)
    with pytest.raises(type(ref_exc.value), match="device"):
        ours(x, hx)


# ---------------------------------------------------------------------------------------------
# Special values: NaN and Inf propagate as torch.nn propagates them, forward and backward;
# saturating and overflowing values give torch.nn's results.


@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
def test_nan_and_inf_in_gradients(backend, nonlinearity):
    ref, ours = rnn_pair(backend, 3, 4, 2, nonlinearity=nonlinearity, bidirectional=True)
    x = _randn(6, 3, 3)
    x[1, 0, 0], x[3, 2, 2], x[4, 2, 1] = float("nan"), float("inf"), -float("inf")
    x.requires_grad_()
    hx = _randn(4, 3, 4, seed=1).requires_grad_()
    a_outs, a_grads = _run(ours, x, hx)
    b_outs, b_grads = _run(ref, x, hx)
    names = ["output", "h_n", "grad x", "grad hx"] + [f"grad {n}" for n, _ in ref.named_parameters()]
    for name, a, b in zip(names, [*a_outs, *a_grads], [*b_outs, *b_grads]):
        _same_special_values(a, b, name, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
def test_saturating_and_overflowing_values(backend, dtype, nonlinearity):
    # Inputs near the dtype's largest value, weights scaled up: tanh saturates at ±1 (zero
    # gradient), relu overflows to Inf, and Inf - Inf gives NaN downstream.
    ref, ours = rnn_pair(backend, 3, 4, 2, nonlinearity=nonlinearity, dtype=dtype)
    with torch.no_grad():
        for module in (ref, ours):
            for p in module.parameters():
                p.mul_(1e3)
    # Row 0 overflows: one entry near the largest value in each of its first three steps, one
    # input feature each. A sum of two finite products that overflow is NaN (Inf - Inf) or an
    # Inf (an FMA absorbing the second exact product) depending on the BLAS kernel, which MKL
    # picks by the number of rows: with one such product per sum (x W_ih^T, and dW_ih = dz^T x)
    # every kernel gives the same special values.
    big = torch.finfo(dtype).max / 4
    x = torch.zeros(5, 2, 3, dtype=dtype)
    signs = _randn(3, dtype=torch.float64).sign().to(dtype)
    for t in range(3):
        x[t, 0, t] = signs[t] * big
    x[:, 1] = _randn(5, 3, seed=2).to(dtype) * 1e3  # a row that saturates without overflowing
    x.requires_grad_()
    a_outs, a_grads = _run(ours, x)
    b_outs, b_grads = _run(ref, x)
    names = ["output", "h_n", "grad x"] + [f"grad {n}" for n, _ in ref.named_parameters()]
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    for name, a, b in zip(names, [*a_outs, *a_grads], [*b_outs, *b_grads]):
        _same_special_values(a, b, name, **tol)


def test_cell_special_values_and_strides(backend):
    ref, ours = cell_pair(backend, 3, 4)
    x = _randn(6, 2, 3)[::2, 1]  # a non-contiguous view
    x[0, 0], x[1, 2] = float("nan"), float("inf")
    hx = _randn(4, 3, seed=1).t()  # transposed
    assert not x.is_contiguous() and not hx.is_contiguous()
    for a, b in zip(_run(ours, x.requires_grad_(), hx)[1], _run(ref, x, hx)[1]):
        _same_special_values(a, b, "cell gradient", rtol=1e-10, atol=1e-10)
    _same_special_values(ours(x, hx), ref(x, hx), "cell output", rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------------------------
# Very long sequences: nothing recursive, no stack or recursion limit, in the kernels or in
# autograd's graph.


def _long_sequence(backend, steps):
    ref, ours = rnn_pair(backend, 1, 3, 1)
    x = _randn(steps, 2, 1).requires_grad_()
    hx = _randn(1, 2, 3, seed=1).requires_grad_()
    a_outs, a_grads = _run(ours, x, hx)
    b_outs, b_grads = _run(ref, x, hx)
    for name, a, b in zip(["output", "h_n", "grad x", "grad hx", "grads"], [*a_outs, *a_grads], [*b_outs, *b_grads]):
        assert_close(a, b, torch.float64, name)


def test_long_sequence(backend):
    _long_sequence(backend, 1_000 if backend == "reference" else 10_000)


@pytest.mark.slow
def test_very_long_sequence(backend):
    _long_sequence(backend, 20_000 if backend == "reference" else 100_000)


# ---------------------------------------------------------------------------------------------
# Gradients through one path only: hx alone (x and the weights frozen), x alone, weights alone.


def _frozen_pair(backend, trainable, **kwargs):
    ref, ours = rnn_pair(backend, 3, 4, 2, bidirectional=True, **kwargs)
    for module in (ref, ours):
        module.requires_grad_(trainable)
    return ref, ours


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("path", ["hx", "x", "weights"])
def test_gradient_through_one_path(backend, path, packed):
    ref, ours = _frozen_pair(backend, path == "weights")
    results = []
    for module in (ref, ours):
        seqs = [_randn(n, 3, seed=n).requires_grad_(path == "x") for n in (4, 2, 5)]
        x = pack_sequence(seqs, enforce_sorted=False) if packed else torch.stack([s[:2] for s in seqs], 1)
        hx = _randn(4, 3, 4, seed=9).requires_grad_(path == "hx")
        leaves = {"hx": [hx], "x": seqs, "weights": list(module.parameters())}[path]
        results.append(_run(module, x, hx, leaves))
    (a_outs, a_grads), (b_outs, b_grads) = results
    assert all(o.requires_grad for o in a_outs)
    for i, (a, b) in enumerate(zip(a_grads, b_grads)):
        assert_close(a, b, torch.float64, f"gradient {i} through {path}")


def test_cell_gradient_through_hx_only(backend):
    ref, ours = cell_pair(backend, 3, 4)
    grads = []
    for module in (ref, ours):
        module.requires_grad_(False)
        hx = _randn(2, 4, seed=1).requires_grad_()
        grads.append(_run(module, _randn(2, 3), hx, [hx])[1][0])
    assert_close(grads[1], grads[0], torch.float64, "grad hx")


# ---------------------------------------------------------------------------------------------
# Double backward: a gradient penalty differentiated again, compared with torch.nn's.


@pytest.mark.parametrize("wrt", ["x", "hx"])
@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
def test_double_backward_matches_torch(backend, wrt, nonlinearity):
    ref, ours = rnn_pair(backend, 3, 4, 2, nonlinearity=nonlinearity, bidirectional=True)
    results = []
    for module in (ref, ours):
        x = _randn(4, 2, 3).requires_grad_()
        hx = _randn(4, 2, 4, seed=1).requires_grad_()
        out, h_n = module(x, hx)
        first = torch.autograd.grad((out**2).sum() + h_n.sum(), x if wrt == "x" else hx, create_graph=True)[0]
        penalty = (first**2).sum()
        results.append([first, *torch.autograd.grad(penalty, [x, hx, *module.parameters()], allow_unused=True)])
    for i, (a, b) in enumerate(zip(results[1], results[0])):
        if b is None:  # relu's second derivative is zero: torch.nn may leave a path unused
            assert a is None or torch.count_nonzero(a) == 0, f"term {i}"
        else:
            assert a is not None, f"term {i}: no gradient"
            assert_close(a, b, torch.float64, f"double backward term {i}")


def test_cell_double_backward_through_hx(backend):
    ref, ours = cell_pair(backend, 3, 4)
    results = []
    for module in (ref, ours):
        hx = _randn(2, 4, seed=1).requires_grad_()
        first = torch.autograd.grad((module(_randn(2, 3), hx) ** 2).sum(), hx, create_graph=True)[0]
        results.append(torch.autograd.grad((first**2).sum(), [hx, *module.parameters()]))
    for a, b in zip(results[1], results[0]):
        assert_close(a, b, torch.float64, "cell double backward")


# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("with_hx", [False, True])
def test_cell_empty_batch_gradients(backend, with_hx):
    ref, ours = cell_pair(backend, 3, 4)

    def make():
        x = torch.zeros(0, 3, dtype=torch.float64, requires_grad=True)
        hx = torch.zeros(0, 4, dtype=torch.float64, requires_grad=True)
        return ((x, hx), [x, hx]) if with_hx else ((x,), [x])

    out = check_module(ref, ours, make, torch.float64)[0]
    assert out.shape == (0, 4) and out.requires_grad
