"""``cpp``: the extension's fused kernels: one call per RNN forward, every layer and direction, and
one backward, recorded by a C++ autograd node.

Where a time step happens: on the CPU, ``csrc/kernels/cpu/rnn_cpu_kernels.cpp`` (path ``tiles``:
register-tiled, for small hidden sizes) or the per-step GEMM loop of ``csrc/ops/rnn_layer.h``
(path ``gemm``); on CUDA (when the extension was built with it), the persistent kernels of
``csrc/kernels/cuda/rnn_cuda_device.cuh`` (one launch per sequence, W_hh in registers or shared
memory) or the same per-step loop on cuBLAS. The ops and their autograd are declared in
:mod:`myrnn_fast.ops`; the knobs that pick a path are :mod:`myrnn_fast.config`'s ``cpu_*`` and
``cuda_*``. The kernels cover float32, float64, float16 and bfloat16 (the CPU kernels read and
write 16-bit storage; CUDA computes it in float32); complex RNNs, which torch.nn also accepts, run through the torch backend's vectorized loop instead.

How a call reaches the kernels (the one place that says why):

- **A module's usual call** (a plain CPU tensor, nothing recorded, autocast off: the module
  checks those in Python) goes whole to ``_C.rnn_module_forward`` (``RNN``) or
  ``_C.rnn_cell_module_forward`` (``RNNCell``): the module's reshaping and checks in C++ around
  ``_C.rnn_stack``'s or ``_C.rnn_cell``'s work, or ``None`` where the call is anything else, for
  the module's Python path (which raises torch.nn's errors). It saves about half of the Python a
  forward paid before, at short sequences and small steps most of its cost above the kernels.
- **Eager calls on plain tensors** go through two entries of the extension: ``_C.rnn_stack``, a
  whole ``RNN`` (every layer and direction; :func:`layer` is a one-layer stack), and
  ``_C.rnn_cell``, one ``RNNCell`` step. Each records its autograd node in C++
  (``csrc/ops/eager.cpp``) when a graph is being recorded, and its backward calls the backward
  kernels there. The dispatcher and ``torch.library``'s Python autograd layer, or a Python
  ``autograd.Function``, would cost 30-70 us a training step, more than a short sequence's whole
  work; so Python is paid once per call, not per layer, direction or backward. A backward with
  ``create_graph=True`` (double backward) calls back into :func:`_graph_backward` instead.
- **Everything that records or transforms a program** (``torch.compile``, ``torch.export``,
  ``torch.jit.trace``, tensor subclasses such as fake tensors, ``torch.func`` transforms) gets
  the registered ops ``torch.ops.myrnn_fast.*`` with ``register_fake`` and ``register_autograd``
  (:mod:`myrnn_fast.ops`), one per layer: they are what those systems can see. Dropout between
  layers in training also runs layer by layer (the module draws its masks, as torch.nn does).

Both routes run the same C++ kernels and the same backward; tests check they agree exactly.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import config
from . import _torch
from ._common import eager

try:
    from .. import _C, ops
except ImportError as exc:  # the extension was not built or does not load
    ops = None
    _import_error = str(exc)
    DEVICE_TYPES = ("cpu",)
else:
    DEVICE_TYPES = ("cpu", "cuda") if hasattr(_C, "rnn_forward_cuda") else ("cpu",)  # built with CUDA kernels?
    # From here on the extension's knobs follow myrnn_fast.config (a value this CPU or build
    # cannot take, such as an instruction set it lacks, is a ValueError now).
    config.bind("cpp", _C.set_knob)
    if "cuda" in DEVICE_TYPES:
        config.bind("cuda", _C.set_knob)
    from .. import autotune

    autotune.bind(_C)  # loads the saved path choices named by knob cpu_autotune_file
    module_forward = _C.rnn_module_forward  # RNN.forward's usual call whole (modules.py, RNN.forward)
    cell_module_forward = _C.rnn_cell_module_forward  # and RNNCell.forward's (modules.py, RNNCell.forward)


def unavailable_reason() -> str | None:
    if ops is None:
        return (
            f"the extension myrnn_fast._C does not load ({_import_error}); build it with "
            "`pip install --no-build-isolation .` against the installed torch"
        )
    return None


def _eager(x: Tensor) -> bool:
    """Whether a call on ``x`` takes the eager entries (see the module docstring)."""
    return eager(x, DEVICE_TYPES)


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
    # A one-layer stack: the same kernels, and the same C++ autograd node.
    if (b_ih is None) != (b_hh is None):
        raise RuntimeError("myrnn_fast: b_ih and b_hh must be given together")  # as the kernels say it
    weights = [w_ih, w_hh] if b_ih is None else [w_ih, w_hh, b_ih, b_hh]
    out, h_n = _C.rnn_stack(x, h0.unsqueeze(0), weights, batch_sizes, None, 1, False, b_ih is not None, nonlinearity)
    return out, h_n[0]


def stack(x, hx, weights, num_layers, bidirectional, bias, nonlinearity, batch_sizes, reverse_index):
    """The whole RNN, every layer and direction, in one call: ``(out, h_n [layers * directions, B, H])``,
    or ``None`` where this call does not apply (complex tensors, and everything that records a
    program: the module docstring), for the module to run its loop over :func:`layer`.
    ``weights`` is the flat list in torch.nn's order; ``reverse_index`` (packed and bidirectional
    input only) reverses each sequence in place.
    """
    if x.is_complex() or not _eager(x):
        return None
    return _C.rnn_stack(x, hx, weights, batch_sizes, reverse_index, num_layers, bidirectional, bias, nonlinearity)


def cell(x, h, w_ih, w_hh, b_ih, b_hh, nonlinearity):
    if isinstance(x, Tensor) and x.is_complex():
        return _torch.cell(x, h, w_ih, w_hh, b_ih, b_hh, nonlinearity)
    if not (_eager(x) and type(h) is Tensor):
        return ops.rnn_cell(x, h, w_ih, w_hh, b_ih, b_hh, nonlinearity)
    return _C.rnn_cell(x, h, w_ih, w_hh, b_ih, b_hh, nonlinearity)


def _graph_backward(kind, inputs, grads, needed, batch_sizes, reverse_index, num_layers, bidirectional, bias,
                    nonlinearity):
    """The eager route's backward when it is itself recorded (``create_graph=True``, for double
    backward): the C++ node calls this instead of the kernels, whose gradients would have no graph.
    It runs the same call again in the torch backend's differentiable operations on the saved
    inputs (part of the caller's graph) and differentiates that, with a graph."""
    from ..modules import stacked_layers

    with torch.autocast(inputs[0].device.type, enabled=False):  # the module cast the inputs already
        if kind == "cell":
            outputs = [_torch.cell(*inputs, *[None] * (6 - len(inputs)), nonlinearity)]
        else:
            x, hx, *weights = inputs
            outputs = stacked_layers(_torch, x, hx, weights, batch_sizes, reverse_index, num_layers, bidirectional,
                                     bias, nonlinearity)
    pairs = [(o, g) for o, g in zip(outputs, grads) if g is not None]
    wanted = [t for t, need in zip(inputs, needed) if need]
    if not pairs or not wanted:
        return [None] * len(inputs)
    found = iter(torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], create_graph=True,
                                     allow_unused=True))
    return [next(found) if need else None for need in needed]


if ops is not None:
    _C.set_graph_backward(_graph_backward)
