"""The ``torch.ops.myrnn_fast`` ops of the extension, as torch sees them from Python.

The C++ side (``csrc/``) defines the schemas and the CPU (and, when built, CUDA) kernels. Here
each op gets what the dispatcher cannot learn from C++: a fake implementation (shapes only, for
``torch.compile`` and meta tensors) and, for the two differentiable ops, autograd formulas whose
backward is the op ``rnn_backward``. Importing this module loads the extension; an ImportError
means it was not built.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _C  # noqa: F401  (loading the library registers the ops)

_ops = torch.ops.myrnn_fast


def rnn_forward(
    x: Tensor,
    h0: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None,
    b_hh: Tensor | None,
    batch_sizes: Tensor | None,
    nonlinearity: str,
) -> tuple[Tensor, Tensor]:
    """One layer, one direction: ``(out, h_n)`` for ``x`` [T, B, I], or packed rows [N, I]."""
    return _ops.rnn_forward.default(x, h0, w_ih, w_hh, b_ih, b_hh, batch_sizes, nonlinearity)


def rnn_backward(
    grad_out: Tensor | None,
    grad_h_n: Tensor | None,
    x: Tensor,
    h0: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    out: Tensor,
    batch_sizes: Tensor | None,
    nonlinearity: str,
    need_grad_x: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(grad_x, grad_h0, grad_w_ih, grad_w_hh, grad_b)``; grad_x is empty unless asked for."""
    return _ops.rnn_backward.default(
        grad_out, grad_h_n, x, h0, w_ih, w_hh, out, batch_sizes, nonlinearity, need_grad_x
    )


def rnn_cell(
    x: Tensor, h: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None, b_hh: Tensor | None, nonlinearity: str
) -> Tensor:
    """One ``RNNCell`` step: ``act(x W_ih^T + b_ih + h W_hh^T + b_hh)``."""
    return _ops.rnn_cell.default(x, h, w_ih, w_hh, b_ih, b_hh, nonlinearity)


# ---- fake implementations: output shapes and dtypes, all outputs contiguous ----------------
# They also serve meta tensors, so they refuse what the real kernels refuse about devices: a
# meta input with CPU weights must not come back as a CPU tensor no kernel wrote.


def _same_device(x: Tensor, *others: Tensor | None, batch_sizes: Tensor | None = None) -> None:
    for t in others:
        if t is not None and t.device != x.device:
            raise RuntimeError(f"myrnn_fast: expected all tensors on {x.device}, found one on {t.device}")
    # batch_sizes lives on the CPU whatever the data's device, as in a PackedSequence.
    if batch_sizes is not None and batch_sizes.device.type == "meta" != x.device.type:
        raise RuntimeError("myrnn_fast: batch_sizes must be a CPU tensor")


@torch.library.register_fake("myrnn_fast::rnn_forward")
def _rnn_forward_fake(x, h0, w_ih, w_hh, b_ih, b_hh, batch_sizes, nonlinearity):
    _same_device(x, h0, w_ih, w_hh, b_ih, b_hh, batch_sizes=batch_sizes)
    return x.new_empty((*x.shape[:-1], w_hh.shape[0])), h0.new_empty(h0.shape)


@torch.library.register_fake("myrnn_fast::rnn_backward")
def _rnn_backward_fake(grad_out, grad_h_n, x, h0, w_ih, w_hh, out, batch_sizes, nonlinearity, need_grad_x):
    _same_device(x, grad_out, grad_h_n, h0, w_ih, w_hh, out, batch_sizes=batch_sizes)
    return (
        x.new_empty(x.shape if need_grad_x else (0,)),
        h0.new_empty(h0.shape),
        w_ih.new_empty(w_ih.shape),
        w_hh.new_empty(w_hh.shape),
        w_hh.new_empty(w_hh.shape[:1]),
    )


@torch.library.register_fake("myrnn_fast::rnn_cell")
def _rnn_cell_fake(x, h, w_ih, w_hh, b_ih, b_hh, nonlinearity):
    _same_device(x, h, w_ih, w_hh, b_ih, b_hh)
    return h.new_empty((x.shape[0], w_hh.shape[0]))


# ---- autograd: the forward saves its output; rnn_backward does the rest ---------------------


def _bias_grads(ctx, grad_b):
    return (grad_b, grad_b) if ctx.has_bias else (None, None)


def _rnn_forward_setup(ctx, inputs, output):
    """What rnn_forward's backward needs: the inputs but the biases, and the output."""
    x, h0, w_ih, w_hh, b_ih, _, batch_sizes, nonlinearity = inputs
    ctx.save_for_backward(x, h0, w_ih, w_hh, output[0], batch_sizes)
    ctx.nonlinearity = nonlinearity
    ctx.has_bias = b_ih is not None


def _rnn_forward_backward(ctx, grad_out, grad_h_n):
    """rnn_forward's backward: the op ``rnn_backward``, or differentiable formulas when autograd
    records the backward itself (create_graph=True)."""
    x, h0, w_ih, w_hh, out, batch_sizes = ctx.saved_tensors
    need_x = ctx.needs_input_grad[0]
    backward = _rnn_backward_with_graph if torch.is_grad_enabled() else rnn_backward
    grad_x, grad_h0, grad_w_ih, grad_w_hh, grad_b = backward(
        grad_out, grad_h_n, x, h0, w_ih, w_hh, out, batch_sizes, ctx.nonlinearity, need_x
    )
    return (grad_x if need_x else None, grad_h0, grad_w_ih, grad_w_hh, *_bias_grads(ctx, grad_b), None, None)


def _rnn_backward_with_graph(grad_out, grad_h_n, x, h0, w_ih, w_hh, out, batch_sizes, nonlinearity, need_grad_x):
    """``rnn_backward`` in differentiable torch operations (the torch backend's formulas), for a
    backward run with ``create_graph=True``: double backward needs a graph of the backward."""
    from .backends._common import as_rows
    from .backends._torch import layer_backward

    hidden = w_hh.shape[0]
    rows, batch_sizes = as_rows(x, batch_sizes)  # a list from here on
    out_rows = out.reshape(-1, hidden)
    grad_out = torch.zeros_like(out_rows) if grad_out is None else grad_out.reshape(-1, hidden)
    grad_h_n = torch.zeros_like(h0) if grad_h_n is None else grad_h_n
    grad_rows, *rest = layer_backward(
        grad_out, grad_h_n, rows, h0, w_ih, w_hh, out_rows, batch_sizes,
        nonlinearity == "relu", (need_grad_x, True, True, True, True),
    )
    return (grad_rows.view(x.shape) if need_grad_x else None, *rest)


torch.library.register_autograd(
    "myrnn_fast::rnn_forward", _rnn_forward_backward, setup_context=_rnn_forward_setup
)


def _rnn_cell_setup(ctx, inputs, output):
    x, h, w_ih, w_hh, b_ih, _, nonlinearity = inputs
    ctx.save_for_backward(x, h, w_ih, w_hh, output)
    ctx.nonlinearity = nonlinearity
    ctx.has_bias = b_ih is not None


def _rnn_cell_backward(ctx, grad_y):
    """rnn_cell's backward (as :func:`_rnn_forward_backward`)."""
    # A cell step is a one-step layer: its backward is the layer's with T = 1.
    x, h, w_ih, w_hh, y = ctx.saved_tensors
    need_x = ctx.needs_input_grad[0]
    backward = _rnn_backward_with_graph if torch.is_grad_enabled() else rnn_backward
    grad_x, grad_h, grad_w_ih, grad_w_hh, grad_b = backward(
        grad_y.unsqueeze(0), None, x.unsqueeze(0), h, w_ih, w_hh, y.unsqueeze(0), None, ctx.nonlinearity, need_x
    )
    return (grad_x[0] if need_x else None, grad_h, grad_w_ih, grad_w_hh, *_bias_grads(ctx, grad_b), None)


torch.library.register_autograd("myrnn_fast::rnn_cell", _rnn_cell_backward, setup_context=_rnn_cell_setup)
