"""``cpp``: the extension's fused ops, one call per layer forward and one per layer backward.

Where a time step happens: on the CPU, ``csrc/kernels/cpu/rnn_cpu_kernels.cpp`` (path ``tiles``:
register-tiled, for small hidden sizes) or the per-step GEMM loop of ``csrc/ops/rnn_layer.h``
(path ``gemm``); on CUDA (when the extension was built with it), the persistent kernels of
``csrc/kernels/cuda/rnn_cuda_device.cuh`` (one launch per sequence, W_hh in registers or shared
memory) or the same per-step loop on cuBLAS. The ops and their autograd are declared in
:mod:`myrnn_fast.ops`; the knobs that pick a path are :mod:`myrnn_fast.config`'s ``cpu_*`` and
``cuda_*``. The kernels cover float32, float64, float16 and bfloat16 (the CPU kernels read and
write 16-bit storage; CUDA computes it in float32); complex RNNs, which torch.nn also accepts, run through the torch backend's vectorized loop instead.

How a call reaches the kernels (the one place that says why):

- **Eager calls on plain tensors** go to the kernels through the extension's pybind11 entries
  (``_C.rnn_stack_forward``, ``rnn_forward_<device>``, ``rnn_backward_<device>``,
  ``rnn_cell_<device>``), with autograd, when a graph is recorded, by the plain
  ``autograd.Function`` classes below, whose backward calls the backward entry. The dispatcher and
  ``torch.library``'s Python autograd layer would cost some 30 us a call (forward and
  backward), more than a short sequence's whole work; a whole ``RNN`` (every layer and
  direction, :func:`stack`) is one such call, so Python is paid once, not per layer.
- **Everything that records or transforms a program** (``torch.compile``, ``torch.export``,
  ``torch.jit.trace``, tensor subclasses such as fake or functorch tensors) gets the registered
  ops ``torch.ops.myrnn_fast.*`` with ``register_fake`` and ``register_autograd``
  (:mod:`myrnn_fast.ops`), one per layer: they are what those systems can see. Dropout between
  layers in training also runs layer by layer (the module draws its masks, as torch.nn does).

Both routes run the same C++ kernels and the same backward; tests check they agree exactly.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import config
from . import _torch

try:
    from .. import _C, ops
except ImportError as exc:  # the extension was not built or does not load
    ops = None
    _import_error = str(exc)
    DEVICE_TYPES = ("cpu",)
else:
    # The ops' kernels without the dispatcher, by device type, for eager calls (the module's
    # docstring says why).
    _FORWARD = {"cpu": _C.rnn_forward_cpu}
    _BACKWARD = {"cpu": _C.rnn_backward_cpu}
    _CELL = {"cpu": _C.rnn_cell_cpu}
    if hasattr(_C, "rnn_forward_cuda"):  # built with CUDA kernels
        _FORWARD["cuda"] = _C.rnn_forward_cuda
        _BACKWARD["cuda"] = _C.rnn_backward_cuda
        _CELL["cuda"] = _C.rnn_cell_cuda
    DEVICE_TYPES = tuple(_FORWARD)
    # From here on the extension's knobs follow myrnn_fast.config (a value this CPU or build
    # cannot take, such as an instruction set it lacks, is a ValueError now).
    config.bind("cpp", _C.set_knob)
    if "cuda" in DEVICE_TYPES:
        config.bind("cuda", _C.set_knob)
    from .. import autotune

    autotune.bind(_C)  # loads the saved path choices named by knob cpu_autotune_file


def unavailable_reason() -> str | None:
    if ops is None:
        return (
            f"the extension myrnn_fast._C does not load ({_import_error}); build it with "
            "`pip install --no-build-isolation .` against the installed torch"
        )
    return None


def _eager(x: Tensor) -> bool:
    """Whether a call on ``x`` takes the pybind11 entries (see the module docstring)."""
    return type(x) is Tensor and x.device.type in _FORWARD and not torch.compiler.is_compiling()


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
    if isinstance(x, Tensor) and x.is_complex():
        return _torch.layer(x, h0, w_ih, w_hh, b_ih, b_hh, nonlinearity, batch_sizes)
    if not _eager(x):
        return ops.rnn_forward(x, h0, w_ih, w_hh, b_ih, b_hh, batch_sizes, nonlinearity)
    if not torch.is_grad_enabled():
        return _FORWARD[x.device.type](x, h0, w_ih, w_hh, b_ih, b_hh, batch_sizes, nonlinearity)
    return _EagerLayer.apply(x, h0, w_ih, w_hh, b_ih, b_hh, batch_sizes, nonlinearity)


class _EagerLayer(torch.autograd.Function):
    """rnn_forward's autograd for eager calls: the op's (same saved tensors, same backward), in
    a plain autograd.Function around the pybind11 entries."""

    @staticmethod
    def forward(ctx, x, h0, w_ih, w_hh, b_ih, b_hh, batch_sizes, nonlinearity):
        out, h_n = _FORWARD[x.device.type](x, h0, w_ih, w_hh, b_ih, b_hh, batch_sizes, nonlinearity)
        ops.save_layer_context(ctx, (x, h0, w_ih, w_hh, b_ih, b_hh, batch_sizes, nonlinearity), out)
        ctx.kernel = _BACKWARD[x.device.type]
        return out, h_n

    @staticmethod
    def backward(ctx, grad_out, grad_h_n):
        return ops.rnn_forward_backward(ctx, grad_out, grad_h_n, ctx.kernel)


def stack(x, hx, weights, num_layers, bidirectional, bias, nonlinearity, batch_sizes, reverse_index, per_layer):
    """The whole RNN, every layer and direction, in one call: ``(out, h_n [layers * directions, B, H])``.

    The module layer's own loop (``per_layer(x, hx, weights)``, over :func:`layer`) computes the
    same; it runs instead where this call does not apply: complex tensors, and everything that
    records a program (the module docstring). ``weights`` is the flat list in torch.nn's order;
    ``reverse_index`` (packed and bidirectional input only) reverses each sequence in place.
    """
    if x.is_complex() or not _eager(x):
        return per_layer(x, hx, weights)
    args = (batch_sizes, reverse_index, num_layers, bidirectional, bias, nonlinearity)
    if not torch.is_grad_enabled():
        out, h_n = _C.rnn_stack_forward(x, hx, weights, *args, False)
        return out, h_n
    return _EagerStack.apply(x, hx, (args, per_layer), *weights)


class _EagerStack(torch.autograd.Function):
    """:func:`stack`'s autograd: one backward call for every layer and direction."""

    @staticmethod
    def forward(ctx, x, hx, spec, *weights):
        out, h_n, *saved = _C.rnn_stack_forward(x, hx, weights, *spec[0], True)
        ctx.save_for_backward(x, hx, *weights, *saved)
        ctx.spec, ctx.n_weights = spec, len(weights)
        return out, h_n

    @staticmethod
    def backward(ctx, grad_out, grad_h_n):
        x, hx, *rest = ctx.saved_tensors
        weights, saved = rest[: ctx.n_weights], rest[ctx.n_weights :]
        args, per_layer = ctx.spec
        if torch.is_grad_enabled():
            # create_graph=True: the per-layer route records a differentiable backward; run it
            # again on the saved inputs (part of the caller's graph) and differentiate that.
            return _double_backward(per_layer, x, hx, weights, grad_out, grad_h_n, ctx.needs_input_grad)
        need_x = ctx.needs_input_grad[0]
        grad_x, grad_hx, *grad_weights = _C.rnn_stack_backward(
            grad_out, grad_h_n, x, hx, weights, saved, *args, need_x
        )
        return (grad_x if need_x else None, grad_hx, None, *grad_weights)


def _double_backward(per_layer, x, hx, weights, grad_out, grad_h_n, needs_input_grad):
    inputs = [x, hx, *weights]
    wanted = [t for t, need in zip(inputs, needs_input_grad[:2] + needs_input_grad[3:]) if need]
    out, h_n = per_layer(x, hx, weights)
    pairs = [(t, g) for t, g in ((out, grad_out), (h_n, grad_h_n)) if g is not None]
    grads = iter(torch.autograd.grad([t for t, _ in pairs], wanted, [g for _, g in pairs], create_graph=True,
                                     allow_unused=True))
    result = [next(grads) if need else None for need in needs_input_grad[:2] + needs_input_grad[3:]]
    return (*result[:2], None, *result[2:])


def cell(x, h, w_ih, w_hh, b_ih, b_hh, nonlinearity):
    if isinstance(x, Tensor) and x.is_complex():
        return _torch.cell(x, h, w_ih, w_hh, b_ih, b_hh, nonlinearity)
    if not (_eager(x) and type(h) is Tensor):
        return ops.rnn_cell(x, h, w_ih, w_hh, b_ih, b_hh, nonlinearity)
    if torch.is_grad_enabled():
        return _EagerCell.apply(x, h, w_ih, w_hh, b_ih, b_hh, nonlinearity)
    return _CELL[x.device.type](x, h, w_ih, w_hh, b_ih, b_hh, nonlinearity)


class _EagerCell(torch.autograd.Function):
    """rnn_cell's autograd for eager calls (the op's, as for _EagerLayer)."""

    @staticmethod
    def forward(ctx, x, h, w_ih, w_hh, b_ih, b_hh, nonlinearity):
        y = _CELL[x.device.type](x, h, w_ih, w_hh, b_ih, b_hh, nonlinearity)
        ops.save_cell_context(ctx, (x, h, w_ih, w_hh, b_ih, b_hh, nonlinearity), y)
        ctx.kernel = _BACKWARD[x.device.type]
        return y

    @staticmethod
    def backward(ctx, grad_y):
        return ops.rnn_cell_backward(ctx, grad_y, ctx.kernel)
