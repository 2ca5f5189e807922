"""``cpp``: the extension's fused ops, one call per layer forward and one per layer backward.

Where a time step happens: on the CPU, ``csrc/kernels/cpu/rnn_cpu_kernels.cpp`` (path ``tiles``:
register-tiled, for small hidden sizes) or the per-step GEMM loop of ``csrc/ops/rnn_layer.h``
(path ``gemm``); on CUDA (when the extension was built with it), the persistent kernels of
``csrc/kernels/cuda/rnn_cuda_device.cuh`` (one launch per sequence, W_hh in registers or shared
memory) or the same per-step loop on cuBLAS. The ops and their autograd are declared in
:mod:`myrnn_fast.ops`; the knobs that pick a path are :mod:`myrnn_fast.config`'s ``cpu_*`` and
``cuda_*``. The kernels cover float32 and float64 (float16 and bfloat16 computed in float32);
complex RNNs, which torch.nn also accepts, run through the torch backend's vectorized loop instead.
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
    # The ops' kernels without the dispatcher, by device type, for eager calls (see layer()).
    _FORWARD = {"cpu": _C.rnn_forward_cpu}
    _CELL = {"cpu": _C.rnn_cell_cpu}
    if hasattr(_C, "rnn_forward_cuda"):  # built with CUDA kernels
        _FORWARD["cuda"] = _C.rnn_forward_cuda
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
    if type(x) is Tensor and not torch.compiler.is_compiling():  # subclasses (fake, functorch) dispatch
        forward = _FORWARD.get(x.device.type)
        if forward is not None and not torch.is_grad_enabled():
            # No graph to record: the kernel without the dispatcher and register_autograd's
            # Python layer (some 5 us, which is what a short sequence costs in all).
            return forward(x, h0, w_ih, w_hh, b_ih, b_hh, batch_sizes, nonlinearity)
        if forward is not None:
            return _EagerLayer.apply(x, h0, w_ih, w_hh, b_ih, b_hh, batch_sizes, nonlinearity)
    return ops.rnn_forward(x, h0, w_ih, w_hh, b_ih, b_hh, batch_sizes, nonlinearity)


class _EagerLayer(torch.autograd.Function):
    """The op's autograd (``ops``: same saved tensors, same backward function and op) in a plain
    autograd.Function for eager calls: torch.library's Python dispatch layer around
    register_autograd costs some 30 us a forward+backward, more than a short sequence's work.
    torch.compile traces the op and its registered autograd instead."""

    @staticmethod
    def forward(ctx, x, h0, w_ih, w_hh, b_ih, b_hh, batch_sizes, nonlinearity):
        out, h_n = _FORWARD[x.device.type](x, h0, w_ih, w_hh, b_ih, b_hh, batch_sizes, nonlinearity)
        ops.save_layer_context(ctx, (x, h0, w_ih, w_hh, b_ih, b_hh, batch_sizes, nonlinearity), out)
        return out, h_n

    @staticmethod
    def backward(ctx, grad_out, grad_h_n):
        return ops.rnn_forward_backward(ctx, grad_out, grad_h_n)


def cell(x, h, w_ih, w_hh, b_ih, b_hh, nonlinearity):
    if isinstance(x, Tensor) and x.is_complex():
        return _torch.cell(x, h, w_ih, w_hh, b_ih, b_hh, nonlinearity)
    if not torch.is_grad_enabled() and not torch.compiler.is_compiling():
        return cell_step(x, h, w_ih, w_hh, b_ih, b_hh, nonlinearity)
    return ops.rnn_cell(x, h, w_ih, w_hh, b_ih, b_hh, nonlinearity)


def cell_step(x, h, w_ih, w_hh, b_ih, b_hh, nonlinearity):
    """A step that records no graph: the rnn_cell op's CPU kernel without the dispatcher and the
    Python autograd layer, which together cost more than a small step itself. It validates its
    arguments like the op (and refuses complex ones). Tensor subclasses (fake tensors, functorch
    wrappers) go through the op, whose dispatcher knows them."""
    step = _CELL.get(x.device.type) if type(x) is Tensor and type(h) is Tensor else None
    if step is None:
        return ops.rnn_cell(x, h, w_ih, w_hh, b_ih, b_hh, nonlinearity)
    return step(x, h, w_ih, w_hh, b_ih, b_hh, nonlinearity)
