"""ONNX: a myrnn_fast layer is ONNX's standard ``RNN`` operator, one node per layer and direction.

Three ways in, one mapping (``X [T, B, I]``, ``W = w_ih[None]``, ``R = w_hh[None]``,
``B = cat(b_ih, b_hh)[None]``, ``initial_h = h0[None]``, ``activations = [Tanh|Relu]``; the
outputs ``Y [T, 1, B, H]`` and ``Y_h [1, B, H]`` lose their direction axis):

- ``torch.onnx.export(model, args, dynamo=True)`` needs nothing more: while it records, each
  layer is emitted as that node through ``torch.onnx.ops.symbolic_multi_out`` (see
  :func:`rnn_node`), so the extension is not needed either. The reverse direction is the forward
  node between two flips, and ``batch_first`` a transpose on each side, as in eager.
- An ``ExportedProgram`` that already holds ``torch.ops.myrnn_fast.rnn_forward`` (from
  ``torch.export.export``) converts with ``custom_translation_table=onnx_translation_table()``:
  the same node, written in onnxscript.
- The TorchScript-based exporter (``dynamo=False``) finds a symbolic for the op, registered the
  first time such an export records a myrnn_fast layer.

:func:`export_onnx` wraps the first with dynamic ``T`` and ``B``. ONNX Runtime's ``RNN`` computes
in float32, so other floating dtypes are cast to it and back around the node.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

_ACTIVATIONS = {"tanh": "Tanh", "relu": "Relu"}
_OPSET = 14  # RNN's latest revision (layout); the exporter writes opset 18 or newer


def _activation(nonlinearity: str) -> str:
    try:
        return _ACTIVATIONS[nonlinearity]
    except KeyError:
        raise ValueError(f"Unknown nonlinearity '{nonlinearity}'. Select from 'tanh' or 'relu'.") from None


def rnn_node(x: Tensor, h0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih, b_hh, nonlinearity: str):
    """One layer, one direction, as ONNX's ``RNN`` node in the graph ``torch.onnx.export``
    (dynamo) records; ``x`` is ``[T, B, I]``. Returns ``(out [T, B, H], h_n [B, H])``."""
    activation = _activation(nonlinearity)
    dtype = x.dtype
    if dtype != torch.float32:  # ONNX Runtime's RNN kernel is float32 only
        x, h0, w_ih, w_hh, b_ih, b_hh = (t if t is None else t.float() for t in (x, h0, w_ih, w_hh, b_ih, b_hh))
    steps, batch, hidden = x.shape[0], x.shape[1], w_hh.shape[0]
    bias = None if b_ih is None else torch.cat((b_ih, b_hh)).unsqueeze(0)
    y, y_h = torch.onnx.ops.symbolic_multi_out(
        "RNN",
        (x, w_ih.unsqueeze(0), w_hh.unsqueeze(0), bias, None, h0.unsqueeze(0)),
        {"activations": [activation], "hidden_size": int(hidden)},
        dtypes=(torch.float32, torch.float32),
        shapes=((steps, 1, batch, hidden), (1, batch, hidden)),
        version=_OPSET,
    )
    return y.squeeze(1).to(dtype), y_h.squeeze(0).to(dtype)


# ---- onnxscript translations of the extension's ops, for graphs that already hold them ------


def onnx_translation_table() -> dict:
    """``{op: onnxscript function}`` for ``torch.onnx.export(..., custom_translation_table=...)``:
    what converts an ``ExportedProgram`` holding ``torch.ops.myrnn_fast.rnn_forward`` /
    ``rnn_cell`` (a model passed to ``torch.onnx.export`` directly needs no table)."""
    from .backends import _cpp

    if _cpp.ops is None:  # no extension, no op: an exported program cannot hold it either
        return {}
    forward, cell = _translations()
    return {
        torch.ops.myrnn_fast.rnn_forward.default: forward,
        torch.ops.myrnn_fast.rnn_cell.default: cell,
    }


def _translations():
    from onnxscript import opset18 as op

    def rnn_forward(x, h0, w_ih, w_hh, b_ih=None, b_hh=None, batch_sizes=None, nonlinearity="tanh"):
        if batch_sizes is not None:
            raise ValueError("myrnn_fast.onnx: packed input (batch_sizes) has no ONNX translation; export on padded input")
        hidden = w_hh.shape[0]
        zero = op.Constant(value_ints=[0])
        bias = None if b_ih is None else op.Unsqueeze(op.Concat(b_ih, b_hh, axis=0), zero)
        y, y_h = op.RNN(
            x, op.Unsqueeze(w_ih, zero), op.Unsqueeze(w_hh, zero), bias, None, op.Unsqueeze(h0, zero),
            activations=[_activation(nonlinearity)], hidden_size=int(hidden),
        )
        return op.Squeeze(y, op.Constant(value_ints=[1])), op.Squeeze(y_h, zero)

    def rnn_cell(x, h, w_ih, w_hh, b_ih=None, b_hh=None, nonlinearity="tanh"):
        z = op.Add(op.MatMul(x, op.Transpose(w_ih, perm=[1, 0])), op.MatMul(h, op.Transpose(w_hh, perm=[1, 0])))
        if b_ih is not None:
            z = op.Add(z, op.Add(b_ih, b_hh))
        return op.Tanh(z) if nonlinearity == "tanh" else op.Relu(z)

    return rnn_forward, rnn_cell


# ---- the TorchScript-based exporter (dynamo=False) -------------------------------------------

_legacy_registered = False


def register_legacy_symbolic() -> None:
    """Teach ``torch.onnx.export(..., dynamo=False)`` the op (it looks symbolics up after
    tracing, so registering while the trace records is in time)."""
    global _legacy_registered
    if _legacy_registered:
        return
    from torch.onnx import symbolic_helper

    def absent(g):  # an optional input left out
        node = g.op("prim::Constant")
        node.setType(torch._C.OptionalType.ofTensor())
        return node

    @symbolic_helper.parse_args("v", "v", "v", "v", "v", "v", "v", "s")
    def rnn_forward(g, x, h0, w_ih, w_hh, b_ih, b_hh, batch_sizes, nonlinearity):
        zero = g.op("Constant", value_t=torch.tensor([0]))
        inputs = [x, g.op("Unsqueeze", w_ih, zero), g.op("Unsqueeze", w_hh, zero)]
        if symbolic_helper._is_none(b_ih):
            inputs.append(absent(g))
        else:
            inputs.append(g.op("Unsqueeze", g.op("Concat", b_ih, b_hh, axis_i=0), zero))
        inputs += [absent(g), g.op("Unsqueeze", h0, zero)]
        hidden = symbolic_helper._get_tensor_sizes(w_hh)[0]
        y, y_h = g.op("RNN", *inputs, activations_s=[_activation(nonlinearity)], hidden_size_i=hidden, outputs=2)
        return g.op("Squeeze", y, g.op("Constant", value_t=torch.tensor([1]))), g.op("Squeeze", y_h, zero)

    torch.onnx.register_custom_op_symbolic("myrnn_fast::rnn_forward", rnn_forward, _OPSET)
    _legacy_registered = True


# ---- one call ---------------------------------------------------------------------------------


def export_onnx(model: torch.nn.Module, args: tuple, path: str | os.PathLike | None = None, **kwargs):
    """``torch.onnx.export(model, args, path, dynamo=True)`` with ``T`` and ``B`` dynamic.

    ``args`` are the model's positional arguments; the first is the input (``[T, B, I]``, or
    ``[B, T, I]`` for a ``batch_first`` model found in ``model``), and a second, ``hx``, has its
    batch on axis 1. Pass ``dynamic_shapes=`` (and any other ``torch.onnx.export`` argument) to
    say otherwise. Returns the ``ONNXProgram``.
    """
    from torch.export import Dim

    if "dynamic_shapes" not in kwargs:
        batch_first = any(getattr(m, "batch_first", False) for m in model.modules())
        steps, batch = Dim("T"), Dim("B")
        shapes = [{0: batch, 1: steps} if batch_first else {0: steps, 1: batch}]
        if len(args) > 1:
            shapes.append({1: batch} if args[1] is not None else None)
        kwargs["dynamic_shapes"] = tuple(shapes) + (None,) * (len(args) - len(shapes))
    kwargs.setdefault("custom_translation_table", onnx_translation_table())
    return torch.onnx.export(model, tuple(args), path, dynamo=True, **kwargs)
