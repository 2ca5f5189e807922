"""Equivalence helpers: run ours and torch.nn with the same weights, compare values and gradients."""

from __future__ import annotations

import torch
from torch.nn.utils.rnn import PackedSequence

import myrnn_fast

# fp32 results differ from torch.nn's only by summation order (b_ih + b_hh first, GEMM blocking).
# float16 / bfloat16 (modules in those dtypes, or autocast): both sides round every stored value
# (each step's state, the projections, the gradients) to 8 (bfloat16) or 11 (float16) significant
# bits, in different orders, so they agree to a few units in the last place of the values' scale.
TOLERANCES = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.bfloat16: dict(rtol=4e-2, atol=4e-2),
    torch.float16: dict(rtol=1e-2, atol=1e-2),
}


def randn(*shape, dtype=torch.float64, seed=0, grad=True, device="cpu"):
    """Seeded normal values (scaled by 0.5), drawn on the CPU so every device sees the same ones."""
    g = torch.Generator().manual_seed(seed)
    t = (0.5 * torch.randn(*shape, generator=g, dtype=torch.float64)).to(device=device, dtype=dtype)
    return t.requires_grad_(grad)


def layer_args(T=4, B=3, I=2, H=5, dtype=torch.float64, bias=True, packed=False, nonlinearity="tanh", device="cpu"):
    """Arguments of the ``rnn_forward`` op: dense [T, B, I] input, or packed rows with batch sizes
    B, B-1, ... (at least 1)."""
    def draw(*shape, seed):
        return randn(*shape, dtype=dtype, seed=seed, device=device)

    if packed:
        sizes = torch.tensor([B] + [max(1, B - t) for t in range(1, T)])
        x = draw(int(sizes.sum()), I, seed=1)
    else:
        sizes = None
        x = draw(T, B, I, seed=1)
    b = (draw(H, seed=4), draw(H, seed=5)) if bias else (None, None)
    return (x, draw(B, H, seed=2), draw(H, I, seed=3), draw(H, H, seed=6), *b, sizes, nonlinearity)


def _pair(ref_cls, our_cls, backend, args, kwargs, dtype, seed):
    torch.manual_seed(seed)
    ref = ref_cls(*args, dtype=dtype, **kwargs)
    ours = our_cls(*args, dtype=dtype, backend=backend, **kwargs)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def rnn_pair(backend, *args, dtype=torch.float64, seed=0, **kwargs):
    """``torch.nn.RNN`` and ``myrnn_fast.RNN`` with identical weights."""
    return _pair(torch.nn.RNN, myrnn_fast.RNN, backend, args, kwargs, dtype, seed)


def cell_pair(backend, *args, dtype=torch.float64, seed=0, **kwargs):
    """``torch.nn.RNNCell`` and ``myrnn_fast.RNNCell`` with identical weights."""
    return _pair(torch.nn.RNNCell, myrnn_fast.RNNCell, backend, args, kwargs, dtype, seed)


def _data(value):
    return value.data if isinstance(value, PackedSequence) else value


def _loss(outputs):
    # Distinct weights per element, so a gradient in the wrong place cannot cancel out.
    total = 0
    for i, out in enumerate(outputs):
        out = _data(out)
        weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=out.device).reshape(out.shape)
        total = total + ((out + 0.1 * i) ** 2 * weights).sum()
    return total


def assert_close(actual, expected, dtype, what):
    torch.testing.assert_close(actual, expected, **TOLERANCES[dtype], msg=lambda m: f"{what}: {m}")


def _call(module, inputs):
    return module(*inputs)


def check_module(ref, ours, make_inputs, dtype, call=_call):
    """Forward both modules on fresh copies of the same inputs (``make_inputs() -> (inputs,
    leaves)``); compare every output and the gradients of every leaf and every parameter."""
    ref_inputs, ref_leaves = make_inputs()
    our_inputs, our_leaves = make_inputs()
    ref_out = call(ref, ref_inputs)
    our_out = call(ours, our_inputs)
    ref_out = ref_out if isinstance(ref_out, tuple) else (ref_out,)
    our_out = our_out if isinstance(our_out, tuple) else (our_out,)

    assert len(ref_out) == len(our_out)
    for i, (a, b) in enumerate(zip(our_out, ref_out)):
        assert type(a) is type(b), f"output {i}: {type(a).__name__} vs {type(b).__name__}"
        if isinstance(b, PackedSequence):
            for field in ("batch_sizes", "sorted_indices", "unsorted_indices"):
                expected, actual = getattr(b, field), getattr(a, field)
                assert (actual is None) if expected is None else torch.equal(actual, expected), field
        assert _data(a).shape == _data(b).shape, f"output {i} shape"
        assert _data(a).dtype == _data(b).dtype
        assert_close(_data(a), _data(b), dtype, f"output {i}")

    ref_params = dict(ref.named_parameters())
    our_params = dict(ours.named_parameters())
    assert list(our_params) == list(ref_params)
    ref_grads = torch.autograd.grad(_loss(ref_out), [*ref_leaves, *ref_params.values()], allow_unused=True)
    our_grads = torch.autograd.grad(_loss(our_out), [*our_leaves, *our_params.values()], allow_unused=True)
    names = [f"input leaf {i}" for i in range(len(ref_leaves))] + [f"grad of {n}" for n in ref_params]
    for name, a, b in zip(names, our_grads, ref_grads):
        assert b is not None, name
        assert a is not None, f"{name}: no gradient"
        assert_close(a, b, dtype, name)
    return our_out
