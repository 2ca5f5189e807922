"""``torch``: the recurrence vectorized over the batch, with a hand-written backward.

Forward: the input projection of every step is one GEMM; each step then adds ``h W_hh^T`` in
place (``addmm_``) and applies the nonlinearity in place, so a step costs two ATen calls and no
autograd bookkeeping. Only the outputs are saved.

Backward: the reverse recurrence costs two calls a step (``addmm`` folds the incoming hidden
gradient into the output gradient, then a multiply by the activation's derivative, written in
terms of the saved outputs). The gradients of the input, the weights and the biases are then
single GEMMs / reductions over all steps at once. The backward is itself made of differentiable
torch operations, so double backward works.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._common import (
    activation, as_rows, function_grads, gemm_grads, input_projection, like_input,
    needed_grads,
)

DEVICE_TYPES = None  # plain torch operations run wherever torch does


def unavailable_reason() -> str | None:
    return None


class _Layer(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows, h0, w_ih, w_hh, b_ih, b_hh, batch_sizes, relu):
        # Input projection of all steps at once; the recurrence then updates it in place.
        out = input_projection(rows, w_ih, b_ih, b_hh)
        w_hh_t = w_hh.t()
        act_ = torch.relu_ if relu else torch.tanh_
        h_n = torch.empty_like(h0)

        h = h0
        for active, out_t in zip(batch_sizes, out.split(batch_sizes)):
            if active != h.shape[0]:
                # Rows active .. h.shape[0]-1 ended at the step before: their state is final.
                h_n[active : h.shape[0]] = h[active:]
                h = h[:active]
            out_t.addmm_(h, w_hh_t)
            act_(out_t)
            h = out_t
        h_n[: h.shape[0]] = h

        ctx.save_for_backward(rows, h0, w_ih, w_hh, out)
        ctx.batch_sizes = batch_sizes
        ctx.relu = relu
        ctx.has_bias = b_ih is not None
        return out, h_n

    @staticmethod
    def backward(ctx, grad_out, grad_h_n):
        rows, h0, w_ih, w_hh, out = ctx.saved_tensors
        return function_grads(layer_backward(
            grad_out, grad_h_n, rows, h0, w_ih, w_hh, out, ctx.batch_sizes, ctx.relu, needed_grads(ctx)
        ))


def layer_backward(grad_out, grad_h_n, rows, h0, w_ih, w_hh, out, batch_sizes, relu, need):
    """The layer's backward in packed rows, made of differentiable torch operations: the numba
    and cpp backends run it too when a double backward needs a graph of the backward.

    ``need`` flags which of ``(grad_rows, grad_h0, grad_w_ih, grad_w_hh, grad_b)`` to form; the
    others come back as ``None``.
    """
    # Complex RNNs (torch.nn accepts them) take conjugates, as autograd does for every product:
    # the gradient through y = x W^T is g conj(W), through W it is g^T conj(x). A no-op when real.
    w_ih, w_hh, rows, h0, out_conj = w_ih.conj(), w_hh.conj(), rows.conj(), h0.conj(), out.conj()

    # d act(z) / dz from the output y = act(z): 1 - y^2 for tanh; for relu 0 where y <= 0 and 1
    # elsewhere, NaN included, as torch's threshold_backward.
    dact = (out <= 0).logical_not().to(out.dtype) if relu else 1 - out_conj * out_conj
    grad_out_t = grad_out.split(batch_sizes)
    dact_t = dact.split(batch_sizes)

    # Reverse recurrence. g is dL/dh_t in total: the output's own gradient plus what flows
    # back from step t+1, or from h_n for rows whose sequence ends at step t.
    dz_t: list[Tensor] = [None] * len(batch_sizes)  # type: ignore[list-item]
    active_next = 0
    dz_next = None
    for t in range(len(batch_sizes) - 1, -1, -1):
        active = batch_sizes[t]
        if dz_next is None:
            g = grad_out_t[t] + grad_h_n[:active]
        elif active == active_next:
            g = torch.addmm(grad_out_t[t], dz_next, w_hh)
        else:
            g = torch.cat(
                (
                    torch.addmm(grad_out_t[t][:active_next], dz_next, w_hh),
                    grad_out_t[t][active_next:] + grad_h_n[active_next:active],
                )
            )
        dz_next = dz_t[t] = g * dact_t[t]
        active_next = active
    return gemm_grads(torch.cat(dz_t), rows, h0, w_ih, w_hh, out_conj, batch_sizes, need)


def layer(
    x: Tensor,
    h0: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None,
    b_hh: Tensor | None,
    nonlinearity: str,
    batch_sizes: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    activation(nonlinearity)  # validates the name
    rows, batch_sizes = as_rows(x, batch_sizes)  # a list from here on
    out, h_n = _Layer.apply(rows, h0, w_ih, w_hh, b_ih, b_hh, batch_sizes, nonlinearity == "relu")
    return like_input(out, x), h_n


def cell(x, h, w_ih, w_hh, b_ih, b_hh, nonlinearity):
    """One step has nothing to fuse across time: ATen's composite cell is the vectorized step
    (two linear maps, the nonlinearity) in one call, differentiated by autograd."""
    step = torch.rnn_relu_cell if nonlinearity == "relu" else torch.rnn_tanh_cell
    return step(x, h, w_ih, w_hh, b_ih, b_hh)
