"""Deployment: what a trace or an export of ``RNN`` / ``RNNCell`` records, whatever the backend.

``torch.jit.trace`` records dispatcher calls, and ``torch.export`` records what its fake tensors
see; neither can look inside a pybind11 call, a Python ``autograd.Function`` with list
arguments, or a Numba kernel, and a per-step Python loop is recorded unrolled at the example's
length. So while a trace or an export is being recorded, every backend's layer is recorded as
the extension's registered op ``torch.ops.myrnn_fast.rnn_forward``: one node per layer and
direction, with symbolic ``T`` and ``B``, which the extension's kernels run at deployment
(TorchScript, ``torch.export``, AOTInductor). Under ``torch.onnx.export`` the layer is recorded
as ONNX's own ``RNN`` node instead (:mod:`myrnn_fast.onnx`), which needs no extension. A cell
step (``RNNCell``) is recorded as ATen's composite cell, which every route runs as it is.

The backend chosen for the module still runs every eager call. Where the extension does not
load, a trace or export fails at once with :class:`DeploymentError`, naming what works.

This module is itself a backend module as the registry sees one (``layer`` and ``cell`` of the
kernel contract), returned by :func:`myrnn_fast.registry.kernels` while recording.
"""

from __future__ import annotations

import torch
from torch import Tensor

DEVICE_TYPES = None


class DeploymentError(RuntimeError):
    """A route (trace, export) that cannot record this model here; the message says what works."""


def recording() -> bool:
    """True while ``torch.jit.trace`` or ``torch.export`` (also under ``torch.onnx.export``)
    records a graph: then layers are recorded as the extension's op."""
    return torch._C._is_tracing() or torch.compiler.is_exporting()


def _route() -> str:
    return "torch.jit.trace" if torch._C._is_tracing() else "torch.export"


def _ops():
    from .backends import _cpp

    if _cpp.ops is None:
        raise DeploymentError(
            f"{_route()} of a myrnn_fast model records the op torch.ops.myrnn_fast.rnn_forward, "
            f"which needs the C++ extension: {_cpp.unavailable_reason()}. Without it, "
            "torch.onnx.export(model, args, dynamo=True) works (ONNX's own RNN operator); for "
            "TorchScript or torch.export, load the model's state_dict into torch.nn.RNN (same "
            "parameter names and shapes) and trace or export that."
        )
    return _cpp.ops


def packed_input_error() -> DeploymentError:
    return DeploymentError(
        f"{_route()} cannot record a myrnn_fast.RNN called with a PackedSequence: its batch sizes "
        "are data, which a recorded graph would freeze at the example's values. Record the model "
        "on padded input (a [T, B, I] tensor) instead; sequences of different lengths then run "
        "padded, and their outputs past each length are to be ignored."
    )


def _check_dtype(x: Tensor) -> None:
    if x.is_complex():
        raise DeploymentError(
            f"{_route()} of a myrnn_fast model records the extension's op, which has no complex "
            f"kernels (input is {x.dtype}); run complex RNNs eagerly."
        )


def layer(x, h0, w_ih, w_hh, b_ih, b_hh, nonlinearity, batch_sizes=None):
    if batch_sizes is not None:
        raise packed_input_error()
    _check_dtype(x)
    if torch.onnx.is_in_onnx_export():
        from . import onnx

        if torch.compiler.is_exporting():  # torch.onnx.export(dynamo=True): ONNX's RNN node itself
            return onnx.rnn_node(x, h0, w_ih, w_hh, b_ih, b_hh, nonlinearity)
        onnx.register_legacy_symbolic()  # dynamo=False: the trace's op, converted afterwards
    return _ops().rnn_forward(x, h0, w_ih, w_hh, b_ih, b_hh, None, nonlinearity)


def cell(x, h, w_ih, w_hh, b_ih, b_hh, nonlinearity):
    """One step has no time axis to freeze: ATen's composite cell records as plain operations
    (matrix products, the nonlinearity) that every route runs without the extension."""
    step = torch.rnn_relu_cell if nonlinearity == "relu" else torch.rnn_tanh_cell
    return step(x, h, w_ih, w_hh, b_ih, b_hh)
