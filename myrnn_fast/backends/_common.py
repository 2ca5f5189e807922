"""What the Python backends share: the contract's two input layouts seen as one, the formulas
that are not sequential (the input projection before the recurrence, the gradient GEMMs after
it), and the Python check of the kernel contract.

The extension has its own copies of the formulas (``csrc/ops/rnn_layer.h``) and of the checks
(``csrc/ops/rnn_checks.h``): C++ cannot call Python.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def as_rows(x: Tensor, batch_sizes: Tensor | None) -> tuple[Tensor, list[int]]:
    """``x`` as packed rows ``[N, I]`` plus ``batch_sizes``, the number of rows of each step.

    Dense ``[T, B, I]`` is the packed layout whose steps all hold ``B`` rows, so both cases run
    through one loop.
    """
    if batch_sizes is None:
        seq_len, batch, features = x.shape
        return x.reshape(seq_len * batch, features), [batch] * seq_len
    return x, batch_sizes.tolist()


def like_input(out_rows: Tensor, x: Tensor) -> Tensor:
    """Give the output ``[N, H]`` the input's layout back (``[T, B, H]`` for dense input)."""
    if x.dim() == 3:
        return out_rows.view(x.shape[0], x.shape[1], out_rows.shape[1])
    return out_rows


def eager(x, device_types) -> bool:
    """Whether a call on ``x`` may bypass the dispatcher for a backend's own entries (the cpp
    backend's C++ autograd nodes, the numba kernels on raw addresses): a plain tensor on one of
    ``device_types``, with no program being recorded (torch.compile, torch.func) that would need
    to see through the call."""
    return (
        type(x) is Tensor and x.device.type in device_types and not torch.compiler.is_compiling()
        and not torch._C._are_functorch_transforms_active()  # torch.func's wrapped tensors are Tensors too
    )


def activation(nonlinearity: str):
    if nonlinearity == "tanh":
        return torch.tanh
    if nonlinearity == "relu":
        return torch.relu
    raise ValueError(f"Unknown nonlinearity '{nonlinearity}'. Select from 'tanh' or 'relu'.")


def input_bias(b_ih: Tensor | None, b_hh: Tensor | None) -> Tensor | None:
    """The two biases act as one: they are added to every step's pre-activation together."""
    return None if b_ih is None else b_ih + b_hh


def input_projection(rows: Tensor, w_ih: Tensor, b_ih: Tensor | None, b_hh: Tensor | None) -> Tensor:
    """``rows @ w_ih^T + b_ih + b_hh`` for every row of every step in one GEMM: the part of each
    pre-activation that does not depend on the previous state, so it need not wait for it."""
    bias = input_bias(b_ih, b_hh)
    if bias is None:
        return rows @ w_ih.t()
    return torch.addmm(bias, rows, w_ih.t())


def previous_rows(batch_sizes: list[int], device: torch.device) -> Tensor:
    """For the packed rows of steps 1.., the row index of the same batch row one step earlier:
    row ``offsets[t] + b`` came from ``offsets[t - 1] + b``, ``batch_sizes[t - 1]`` rows before.
    Built in NumPy, which does this small integer work a few times faster than torch."""
    counts = np.asarray(batch_sizes, dtype=np.int64)
    index = np.arange(batch_sizes[0], counts.sum()) - np.repeat(counts[:-1], counts[1:])
    return torch.from_numpy(index).to(device)


def gemm_grads(
    dz: Tensor,
    rows: Tensor,
    h0: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    out: Tensor,
    batch_sizes: list[int],
    need: tuple[bool, ...],
) -> tuple[Tensor | None, ...]:
    """Everything the backward forms after the reverse recurrence, each one GEMM or reduction over
    all steps at once, from ``dz`` (the gradient of every row's pre-activation).

    ``need`` flags which of ``(grad_rows, grad_h0, grad_w_ih, grad_w_hh, grad_b)`` to form; the
    others come back as ``None``. For complex input the caller passes the conjugates of ``rows``,
    ``h0``, the weights and ``out``, as autograd would.
    """
    batch = h0.shape[0]
    grad_rows = dz @ w_ih if need[0] else None
    grad_h0 = dz[:batch] @ w_hh if need[1] else None  # step 0 holds every row
    grad_w_ih = dz.t() @ rows if need[2] else None
    grad_w_hh = None
    if need[3]:
        # h_{t-1} for every row of every step: h0 for step 0, then the same row's previous
        # output. Dense input needs no gather: it is out shifted by one step.
        if all(n == batch for n in batch_sizes):
            prev = out[: out.shape[0] - batch]
        else:
            prev = out.index_select(0, previous_rows(batch_sizes, out.device))
        grad_w_hh = torch.addmm(dz[:batch].t() @ h0, dz[batch:].t(), prev)
    grad_b = dz.sum(0) if need[4] else None
    return grad_rows, grad_h0, grad_w_ih, grad_w_hh, grad_b


def needed_grads(ctx) -> tuple[bool, ...]:
    """``need`` for :func:`gemm_grads` from a layer Function whose inputs are
    ``(rows, h0, w_ih, w_hh, b_ih, b_hh, ...)``: one flag for both biases, which share a gradient."""
    need = ctx.needs_input_grad
    return need[:4] + (ctx.has_bias and (need[4] or need[5]),)


def function_grads(grads: tuple[Tensor | None, ...]) -> tuple[Tensor | None, ...]:
    """:func:`gemm_grads`'s tuple as such a Function returns it: grad_b for both biases, nothing
    for the two arguments after them (``batch_sizes``, ``relu``)."""
    *first, grad_b = grads
    return (*first, grad_b, grad_b, None, None)


def check_layer_args(backend: str, x, h0, w_ih, w_hh, b_ih, b_hh, nonlinearity, batch_sizes) -> None:
    """Everything the kernel contract promises about ``layer``'s arguments, checked for a backend
    that runs on CPU tensors only, with errors that start with ``"<backend> backend: "``.

    The extension checks the same in C++ (``layer_layout``); this Python copy exists because the
    numba backend must work without the extension, and its raw loops would read out of bounds on
    shapes that do not agree.
    """
    who = f"{backend} backend"
    activation(nonlinearity if isinstance(nonlinearity, str) else repr(nonlinearity))
    tensors = {"x": x, "h0": h0, "w_ih": w_ih, "w_hh": w_hh, "b_ih": b_ih, "b_hh": b_hh}
    for name, t in tensors.items():
        if t is None and name in ("b_ih", "b_hh"):
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{who}: {name} must be a Tensor, got {type(t).__name__}")
        if t.device.type != "cpu":
            raise RuntimeError(
                f"{who}: {name} is on device {t.device}; it runs on CPU tensors only "
                "(the cpp backend and the torch backend run on CUDA)"
            )
        if t.dtype != x.dtype:
            raise RuntimeError(f"{who}: {name} is {t.dtype} but x is {x.dtype}; all must match")
    if (b_ih is None) != (b_hh is None):
        raise RuntimeError(f"{who}: b_ih and b_hh must both be given or both be None")
    if not (x.is_floating_point() or x.is_complex()):
        raise RuntimeError(f"{who}: floating-point tensors expected, got {x.dtype}")
    hidden = w_hh.shape[0] if w_hh.dim() == 2 else -1
    if w_hh.dim() != 2 or w_hh.shape[1] != hidden:
        raise RuntimeError(f"{who}: w_hh must be [H, H], got {list(w_hh.shape)}")
    features = x.shape[-1] if x.dim() else -1
    if w_ih.dim() != 2 or w_ih.shape[0] != hidden or w_ih.shape[1] != features:
        raise RuntimeError(f"{who}: w_ih must be [H={hidden}, I={features}], got {list(w_ih.shape)}")
    for name, b in (("b_ih", b_ih), ("b_hh", b_hh)):
        if b is not None and (b.dim() != 1 or b.shape[0] != hidden):
            raise RuntimeError(f"{who}: {name} must be [H={hidden}], got {list(b.shape)}")
    if h0.dim() != 2 or h0.shape[1] != hidden:
        raise RuntimeError(f"{who}: h0 must be [B, H={hidden}], got {list(h0.shape)}")
    if batch_sizes is None:
        if x.dim() != 3:
            raise RuntimeError(f"{who}: x must be [T, B, I] without batch_sizes, got {list(x.shape)}")
        if x.shape[1] != h0.shape[0]:
            raise RuntimeError(f"{who}: x has batch {x.shape[1]} but h0 has {h0.shape[0]}")
        if x.shape[0] == 0:
            raise RuntimeError(f"{who}: the sequence is empty (T = 0)")
        return
    if not isinstance(batch_sizes, Tensor) or batch_sizes.device.type != "cpu":
        raise RuntimeError(f"{who}: batch_sizes must be a CPU tensor")
    if batch_sizes.dtype != torch.int64 or batch_sizes.dim() != 1 or batch_sizes.numel() == 0:
        raise RuntimeError(f"{who}: batch_sizes must be a non-empty 1-D int64 tensor")
    if x.dim() != 2:
        raise RuntimeError(f"{who}: packed x must be [N, I], got {list(x.shape)}")
    s = batch_sizes
    if bool((s <= 0).any()) or bool((s[1:] > s[:-1]).any()):
        raise RuntimeError(f"{who}: batch_sizes must be positive and non-increasing, got {s.tolist()}")
    if int(s[0]) != h0.shape[0]:
        raise RuntimeError(f"{who}: batch_sizes[0] = {int(s[0])} but h0 has batch {h0.shape[0]}")
    if int(s.sum()) != x.shape[0]:
        raise RuntimeError(f"{who}: batch_sizes sum to {int(s.sum())} but x has {x.shape[0]} rows")
