"""``numba``: the recurrence as ``@njit`` kernels over zero-copy NumPy views of the tensors.

Where a time step happens: :mod:`._numba_kernels` (hand loops over a slice of the batch rows, or
one BLAS GEMM a step once the hidden size is large). This file is the backend around them: its
availability, its thread policy, the autograd Function, ``layer``, and the compile report that
``myrnn-fast info`` prints.

Torch does what is not sequential (``_common``): the input projection of every step is one GEMM
before the forward kernel, and the gradients of the input, the weights and the biases are single
GEMMs after the backward kernel. Only the outputs are saved for the backward; the derivative of
the nonlinearity is taken from them. The module's small one-layer calls skip all that (``stack``):
one kernel call a pass, the projection and the gradients inside it. The modules' usual calls
come whole (``module_forward``, ``cell_module_forward``), skipping the modules' Python too.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import threading
import time

import numpy as np
import torch
from torch import Tensor

from .. import config
from . import _torch
from ._common import (
    check_layer_args, eager, function_grads, gemm_grads, input_projection, like_input,
    needed_grads,
)

DEVICE_TYPES = ("cpu",)

try:
    import numba

    from . import _numba_kernels as kernels
except ImportError as exc:  # the backend reports itself unavailable; nothing below runs
    numba = kernels = None
    _import_error = str(exc)


def unavailable_reason() -> str | None:
    if numba is None:
        return f"Numba does not import ({_import_error}); install it with `pip install numba scipy`"
    # Only whether SciPy is there: importing its BLAS would load OpenBLAS into every process
    # that asks, and the numba_blas_threads knob must act before OpenBLAS loads.
    if importlib.util.find_spec("scipy") is None:
        return "SciPy, whose BLAS Numba's np.dot uses, is not installed; `pip install scipy`"
    return None


# ---------------------------------------------------------------------------------------------
# Process state: applied at the backend's first use, not at import. The registry imports every
# backend to ask whether it is available, and a process that never runs this one must keep its
# threading and BLAS settings as they were.

_start_lock = threading.Lock()
_started = False
_numba_priority: list[str] | None = None  # Numba's own threading-layer priority


def _start() -> None:
    """Bind the numba knobs (config applies the current values now, and every later set)."""
    global _started
    if _started:
        return
    with _start_lock:
        if not _started:
            config.bind("numba", _apply)
            _started = True


_knobs: dict = {}  # every numba knob's value, kept current by config (per-call reads cost)


def _apply(name: str, value) -> None:
    _knobs[name] = value
    if name == "numba_threading_layer":
        _set_threading_layer(value)
    elif name == "numba_blas_threads":
        _set_blas_threads(value)


def _set_threading_layer(choice: str) -> None:
    """Put the chosen layer first in Numba's priority. Numba picks its layer once, at its first
    parallel launch; threads of two pools would fight over the cores, and torch's CPU wheels run
    ATen on GNU OpenMP, so ``auto`` takes the ``omp`` layer there, which shares libgomp's pool.
    The user's own NUMBA_THREADING_LAYER(_PRIORITY) always wins."""
    global _numba_priority
    if {"NUMBA_THREADING_LAYER", "NUMBA_THREADING_LAYER_PRIORITY"} & set(os.environ):
        return
    if _numba_priority is None:
        _numba_priority = list(numba.config.THREADING_LAYER_PRIORITY)
    if choice == "auto":
        choice = "omp" if "ATen parallel backend: OpenMP" in torch.__config__.parallel_info() else "default"
    if choice == "default":
        numba.config.THREADING_LAYER_PRIORITY = list(_numba_priority)
    else:
        numba.config.THREADING_LAYER_PRIORITY = [choice] + [x for x in _numba_priority if x != choice]


def _set_blas_threads(threads: int) -> None:
    """The per-step np.dot runs inside the kernels' own parallel loop over batch rows, so SciPy's
    OpenBLAS needs no threads of its own; left with them, its workers busy-wait after every call
    and take a core from whatever runs next. OpenBLAS reads the variable when it loads: only
    before SciPy's BLAS is loaded, and never over the user's value."""
    if threads > 0 and "scipy.linalg" not in sys.modules:
        os.environ.setdefault("OPENBLAS_NUM_THREADS", str(threads))


# ---------------------------------------------------------------------------------------------
# Threads, views, autograd.


def _threads(rows: int, work: int) -> int:
    """How many row chunks run in parallel: as many as torch's intra-op threads (the same pool
    under the omp layer), never more than Numba started, one when the work (multiply-adds) is
    too small for a second thread to pay off. Set per call because ``torch.set_num_threads``
    may have changed."""
    if work < config.get("numba_parallel_min_work"):
        return 1
    n = min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS, rows // config.get("numba_parallel_min_rows"))
    return max(n, 1)


def _plan(batch_sizes: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """``(batch_sizes, offsets)`` as the kernels take them: int64 arrays."""
    array = np.asarray(batch_sizes, dtype=np.int64)
    offsets = np.zeros(len(batch_sizes), dtype=np.int64)
    np.cumsum(array[:-1], out=offsets[1:])
    return array, offsets


def _dense_plan(seq_len: int, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_plan` of ``[batch] * seq_len`` without the list, which costs more than a short
    sequence's whole recurrence once T is in the hundreds. Kept per shape (the kernels never
    write it): building it costs as much as a small layer's recurrence."""
    plan = _dense_plans.get((seq_len, batch))
    if plan is None:
        if len(_dense_plans) >= 64:
            _dense_plans.clear()
        plan = np.full(seq_len, batch, dtype=np.int64), np.arange(seq_len, dtype=np.int64) * batch
        _dense_plans[seq_len, batch] = plan
    return plan


_dense_plans: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}


def _view(t: Tensor) -> np.ndarray:
    return t.detach().numpy()


def _use_gemm(hidden: int) -> bool:
    return hidden >= config.get("numba_gemm_min_hidden")


def _recurrence(rows, h0, w_ih, w_hh, b_ih, b_hh, plan, relu) -> tuple[Tensor, Tensor]:
    """The forward: the input projection as one torch GEMM, then the kernels add the rest."""
    out = input_projection(rows, w_ih, b_ih, b_hh).contiguous()
    h0c = h0.contiguous()
    batch, hidden = h0.shape
    gemm = _use_gemm(hidden)
    chunks = _threads(batch, out.shape[0] * hidden * hidden)
    if chunks > 1 and gemm:
        return _split_forward(out, h0c, w_hh, plan, relu, chunks)
    h_n = torch.empty_like(h0c)
    out_, h0_, h_n_ = _view(out), _view(h0c), _view(h_n)
    w = _view(w_hh.t().contiguous())  # W_hh^T: the GEMM's right operand, and the tiles' rows k
    if chunks > 1:
        numba.set_num_threads(chunks)
        kernels.forward_parallel(out_, h0_, w, *plan, relu, h_n_, chunks, gemm, _scratch(batch, hidden, gemm, out_))
    elif gemm:
        kernels.forward_gemm(out_, h0_, w, *plan, relu, 0, batch, h_n_, _scratch(batch, hidden, gemm, out_))
    else:
        kernels.forward_rows(out_, h0_, w, *plan, relu, 0, batch, h_n_)
    return out, h_n


def _scratch(batch: int, hidden: int, gemm: bool, like: np.ndarray) -> np.ndarray:
    """Where each step's BLAS product lands (rows of it per thread); the hand loops need none."""
    return np.empty((batch, hidden) if gemm else (0, 0), dtype=like.dtype)


class _Layer(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows, h0, w_ih, w_hh, b_ih, b_hh, batch_sizes, relu, plan):
        out, h_n = _recurrence(rows, h0, w_ih, w_hh, b_ih, b_hh, plan, relu)
        ctx.save_for_backward(rows, h0, w_ih, w_hh, out)
        ctx.batch_sizes, ctx.plan, ctx.relu, ctx.has_bias = batch_sizes, plan, relu, b_ih is not None
        return out, h_n

    @staticmethod
    def backward(ctx, grad_out, grad_h_n):
        rows, h0, w_ih, w_hh, out = ctx.saved_tensors
        need = needed_grads(ctx)
        batch_sizes = ctx.batch_sizes
        if batch_sizes is None:  # dense: every step holds every row
            batch_sizes = [h0.shape[0]] * len(ctx.plan[0])
        grads = _layer_grads(grad_out, grad_h_n, rows, h0, w_ih, w_hh, out, ctx.plan, batch_sizes, ctx.relu, need)
        return (*function_grads(grads), None)


def _layer_grads(grad_out, grad_h_n, rows, h0, w_ih, w_hh, out, plan, batch_sizes, relu, need):
    """:func:`gemm_grads`'s tuple: dz from the backward kernels, then torch's GEMMs; or, under
    create_graph, the torch backend's differentiable formulas (the cpp backend does the same)."""
    if torch.is_grad_enabled():
        return _torch.layer_backward(grad_out, grad_h_n, rows, h0, w_ih, w_hh, out, batch_sizes, relu, need)
    dz = _reverse_recurrence(plan, relu, grad_out, grad_h_n, w_hh, out)
    return gemm_grads(dz, rows, h0, w_ih, w_hh, out, batch_sizes, need)


def _reverse_recurrence(plan, relu, grad_out, grad_h_n, w_hh, out) -> Tensor:
    """dz, the gradient of every row's pre-activation, from the backward kernels."""
    batch, hidden = grad_h_n.shape
    grad_out_, grad_h_n_, out_ = _view(grad_out.contiguous()), _view(grad_h_n.contiguous()), _view(out)
    gemm = _use_gemm(hidden)
    chunks = _threads(batch, out.shape[0] * hidden * hidden)
    if chunks > 1 and gemm:
        return _split_backward(grad_out_, grad_h_n_, out_, w_hh, plan, relu, chunks)
    dz = torch.empty_like(out)
    dz_ = _view(dz)
    w = _view(w_hh.contiguous())
    if chunks > 1:
        numba.set_num_threads(chunks)
        kernels.backward_parallel(dz_, grad_out_, grad_h_n_, out_, w, *plan, relu, chunks, gemm,
                                  _scratch(batch, hidden, gemm, out_))
    elif gemm:
        kernels.backward_gemm(dz_, grad_out_, grad_h_n_, out_, w, *plan, relu, 0, batch, _scratch(batch, hidden, gemm, out_))
    else:
        kernels.backward_rows(dz_, grad_out_, grad_h_n_, out_, w, *plan, relu, 0, batch)
    return dz


# ---------------------------------------------------------------------------------------------
# Several threads and per-step BLAS products: how the threads share a step (knob
# ``numba_gemm_split``). ``rows``: each thread its chunk of the batch through the whole
# sequence (forward_parallel / backward_parallel), never waiting for the others, but each
# streaming all of W_hh every step. ``columns``: each thread a block of W_hh's columns
# (forward_columns / backward_columns), so it reads only its share, which can stay in its
# core's cache, at the price of a join every step. Which wins depends on the cache sizes, the
# batch and the hidden size, so ``auto`` measures both on a kind of call's first use and keeps
# the faster for the process, as the cpp backend's autotuning does.

_splits: dict[tuple, dict] = {}  # kind of call -> {"split", "times_ms"}


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def split_choices() -> list[dict]:
    """The split chosen for each kind of call so far in this process, with the times measured."""
    keys = ("pass", "hidden", "batch_max", "steps_max", "dtype", "threads")
    return [{**dict(zip(keys, key)), **choice} for key, choice in _splits.items()]


def clear_split_choices() -> None:
    _splits.clear()


def _column_blocks(m: Tensor, chunks: int) -> np.ndarray:
    """m's columns as ``chunks`` contiguous blocks, [chunks, K, w], the last padded with zeros."""
    inner, hidden = m.shape
    width = -(-hidden // chunks)
    padded = m.new_zeros(inner, chunks * width)
    padded[:, :hidden] = m
    return _view(padded.view(inner, chunks, width).transpose(0, 1).contiguous())


def _by_split(key: tuple, run, fresh_run) -> object:
    """``run(split)`` by the split the knob forces or this kind of call measured; otherwise time
    ``fresh_run`` (the same, into buffers of its own, so every result is whole) for each split
    twice, interleaved, keep the faster one's name and return its result. The better of two
    leaves out a first run's JIT (or its load from the disk cache)."""
    split = _knobs["numba_gemm_split"]
    if split != "auto":
        return run(split)
    if key in _splits:
        return run(_splits[key]["split"])
    best, results = {}, {}
    for _ in range(2):
        for name in ("rows", "columns"):
            start = time.perf_counter()
            results[name] = fresh_run(name)
            best[name] = min(best.get(name, float("inf")), time.perf_counter() - start)
    split = min(best, key=best.get)
    _splits[key] = {"split": split, "times_ms": {name: round(t * 1e3, 3) for name, t in best.items()}}
    return results[split]


def _split_key(pass_: str, batch: int, hidden: int, seq_len: int, dtype: np.dtype, chunks: int) -> tuple:
    return (pass_, hidden, _pow2(batch), _pow2(seq_len), dtype.name, chunks)


def _split_forward(out, h0, w_hh, plan, relu, chunks):
    """``(out, h_n)``: the forward's recurrence over ``out``, which holds the input projection."""
    batch, hidden = h0.shape
    dtype = _view(out).dtype
    h0_ = _view(h0)
    numba.set_num_threads(chunks)

    def run(split, out):
        h_n = torch.empty_like(h0)
        if split == "columns":
            blocks = _column_blocks(w_hh.t(), chunks)
            scratch = np.empty((chunks, batch, blocks.shape[2]), dtype)
            kernels.forward_columns(_view(out), h0_, blocks, *plan, relu, _view(h_n), scratch)
        else:
            w = _view(w_hh.t().contiguous())
            kernels.forward_parallel(_view(out), h0_, w, *plan, relu, _view(h_n), chunks, True,
                                     np.empty((batch, hidden), dtype))
        return out, h_n

    key = _split_key("forward", batch, hidden, len(plan[0]), dtype, chunks)
    return _by_split(key, lambda split: run(split, out), lambda split: run(split, out.clone()))


def _split_backward(grad_out_, grad_h_n_, out_, w_hh, plan, relu, chunks):
    """dz from the reverse recurrence, as :func:`_split_forward` splits the forward's."""
    batch, hidden = grad_h_n_.shape
    dtype = out_.dtype
    numba.set_num_threads(chunks)

    def run(split):
        dz = np.empty_like(out_)
        if split == "columns":
            blocks = _column_blocks(w_hh, chunks)
            scratch = np.empty((chunks, batch, blocks.shape[2]), dtype)
            kernels.backward_columns(dz, grad_out_, grad_h_n_, out_, blocks, *plan, relu, scratch)
        else:
            kernels.backward_parallel(dz, grad_out_, grad_h_n_, out_, _view(w_hh.contiguous()), *plan, relu,
                                      chunks, True, np.empty((batch, hidden), dtype))
        return torch.from_numpy(dz)

    key = _split_key("backward", batch, hidden, len(plan[0]), dtype, chunks)
    return _by_split(key, run, run)  # each run writes a dz of its own


# ---------------------------------------------------------------------------------------------
# The entry point: validate everything a kernel's raw loops rely on before any of them run.

_KERNEL_DTYPES = (torch.float32, torch.float64)
_UPCAST = (torch.float16, torch.bfloat16)


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
    check_layer_args("numba", x, h0, w_ih, w_hh, b_ih, b_hh, nonlinearity, batch_sizes)
    dtype = x.dtype
    if dtype.is_complex:
        # torch.nn accepts complex RNNs; the kernels are real. The torch backend's loop takes
        # them, as it does for the cpp backend.
        return _torch.layer(x, h0, w_ih, w_hh, b_ih, b_hh, nonlinearity, batch_sizes)
    if dtype in _UPCAST:
        # float16 / bfloat16: computed in float32, rounded once at the end.
        up = [t if t is None else t.float() for t in (x, h0, w_ih, w_hh, b_ih, b_hh)]
        out, h_n = layer(*up, nonlinearity, batch_sizes)
        return out.to(dtype), h_n.to(dtype)
    if dtype not in _KERNEL_DTYPES:
        raise TypeError(f"numba backend: unsupported dtype {dtype}")
    _start()
    relu = nonlinearity == "relu"
    if batch_sizes is None:
        seq_len, batch, features = x.shape
        rows, sizes, plan = x.reshape(seq_len * batch, features), None, _dense_plan(seq_len, batch)
    else:
        rows, sizes = x, batch_sizes.tolist()
        plan = _plan(sizes)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, h0, w_ih, w_hh, b_ih, b_hh)):
        out, h_n = _Layer.apply(rows, h0, w_ih, w_hh, b_ih, b_hh, sizes, relu, plan)
    else:
        # No graph to record: the autograd Function's own cost is most of a short sequence's.
        out, h_n = _recurrence(rows, h0, w_ih, w_hh, b_ih, b_hh, plan, relu)
    return like_input(out, x), h_n


# ---------------------------------------------------------------------------------------------
# The module's whole RNN in one kernel call a pass, where it is one dense layer in one direction
# with little work beside the recurrence: there the torch GEMMs, the NumPy views and the checks
# of the route through ``layer`` cost more than the arithmetic (see the fused section of the
# kernels). Knob ``numba_fused_max_work`` bounds the multiply-adds done by hand loops instead of
# torch's GEMMs: the forward's input projection, T B I H, and the backward's gradients,
# T B H (2 I + H); a backward above it forms them as GEMMs after the kernels' dz.


def stack(x, hx, weights, num_layers, bidirectional, bias, nonlinearity, batch_sizes, reverse_index):
    """``(out [T, B, H], h_n [1, B, H])`` of a one-layer, one-direction dense RNN, or ``None``
    where this route does not apply, for the module to run its loop over :func:`layer`. The
    module has checked the arguments' dtypes, devices and the shapes of ``x`` and ``hx``; the
    kernels read raw memory, so the weights' shapes and every layout are checked here."""
    if num_layers != 1 or bidirectional or batch_sizes is not None or not eager(x, DEVICE_TYPES):
        return None
    relu = _RELU.get(nonlinearity) if isinstance(nonlinearity, str) else None
    if x.dtype not in _NUMPY_DTYPES or relu is None or len(weights) != (4 if bias else 2):
        return None
    return _fused_layer(x, hx[0], weights, bias, relu)


def _fused_layer(x, h0, weights, bias, relu):
    """:func:`stack`'s ``(out, h_n)`` of a float32/float64 layer with ``4 if bias else 2`` weights,
    by the fused kernels, or ``None`` where the sizes or the weights' layouts are not theirs."""
    _start()
    seq_len, batch, features = x.shape
    hidden = h0.shape[1]
    limit = _knobs["numba_fused_max_work"]
    if not limit or seq_len * batch * features * hidden > limit or hidden >= _knobs["numba_gemm_min_hidden"]:
        return None
    dtype = x.dtype
    w_ih, w_hh, b_ih, b_hh = weights if bias else (*weights, None, None)
    shapes = ((hidden, features), (hidden, hidden), (hidden,), (hidden,))
    for w, shape in zip(weights, shapes):
        if w.shape != shape or w.dtype is not dtype or not w.is_contiguous():
            return None
    x, h0 = x.contiguous(), h0.contiguous()
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, h0, *weights)):
        return _Fused.apply(x, h0, w_ih, w_hh, b_ih, b_hh, relu)
    return _fused_forward(x, h0, w_ih, w_hh, b_ih, b_hh, relu)


def _fused_forward(x, h0, w_ih, w_hh, b_ih, b_hh, relu):
    seq_len, batch, features = x.shape
    hidden = h0.shape[1]
    numpy_dtype = _NUMPY_DTYPES[x.dtype]
    out = np.empty((seq_len, batch, hidden), numpy_dtype)
    h_n = np.empty((1, batch, hidden), numpy_dtype)
    bias = b_ih is not None
    b_ih_at, b_hh_at = (b_ih.data_ptr(), b_hh.data_ptr()) if bias else (0, 0)
    args = (x.data_ptr(), h0.data_ptr(), w_ih.data_ptr(), w_hh.data_ptr(), b_ih_at, b_hh_at, bias, features, relu,
            out.reshape(seq_len * batch, hidden), h_n[0])
    chunks = _threads(batch, seq_len * batch * hidden * hidden)
    if chunks > 1:
        numba.set_num_threads(chunks)
        kernels.layer_forward_parallel(*args, chunks)
    else:
        kernels.layer_forward(*args)
    return torch.from_numpy(out), torch.from_numpy(h_n)


class _Fused(torch.autograd.Function):
    """:func:`stack`'s layer: one kernel call forward, one backward where the gradients' work is
    within ``numba_fused_max_work`` and one thread runs the recurrence."""

    @staticmethod
    def forward(ctx, x, h0, w_ih, w_hh, b_ih, b_hh, relu):
        out, h_n = _fused_forward(x, h0, w_ih, w_hh, b_ih, b_hh, relu)
        ctx.save_for_backward(x, h0, w_ih, w_hh, out)
        ctx.relu, ctx.has_bias = relu, b_ih is not None
        return out, h_n

    @staticmethod
    def backward(ctx, grad_out, grad_h_n):
        x, h0, w_ih, w_hh, out = ctx.saved_tensors
        seq_len, batch, features = x.shape
        hidden = h0.shape[1]
        need = needed_grads(ctx)
        rows = seq_len * batch
        grad_out, grad_h_n = grad_out.reshape(rows, hidden), grad_h_n[0]
        if (not torch.is_grad_enabled() and rows * hidden * (2 * features + hidden) <= _knobs["numba_fused_max_work"]
                and _threads(batch, rows * hidden * hidden) == 1):
            grads = _fused_backward(grad_out.contiguous(), grad_h_n.contiguous(), x, h0, w_ih, w_hh, out, ctx.relu,
                                    need)
        else:
            grads = _layer_grads(grad_out, grad_h_n, x.view(rows, features), h0, w_ih, w_hh, out.view(rows, hidden),
                                 _dense_plan(seq_len, batch), [batch] * seq_len, ctx.relu, need)
        grad_x, grad_h0, grad_w_ih, grad_w_hh, grad_b = grads
        if grad_x is not None:
            grad_x = grad_x.view(x.shape)
        return grad_x, grad_h0, grad_w_ih, grad_w_hh, grad_b, grad_b, None


def _fused_backward(grad_out, grad_h_n, x, h0, w_ih, w_hh, out, relu, need):
    seq_len, batch, features = x.shape
    hidden = h0.shape[1]
    numpy_dtype = _NUMPY_DTYPES[x.dtype]
    dx = np.empty((seq_len * batch, features) if need[0] else (0, features), numpy_dtype)
    dh0, dw_ih = np.empty((batch, hidden), numpy_dtype), np.empty((hidden, features), numpy_dtype)
    dw_hh, db = np.empty((hidden, hidden), numpy_dtype), np.empty(hidden, numpy_dtype)
    kernels.layer_backward(grad_out.data_ptr(), grad_h_n.data_ptr(), x.data_ptr(), h0.data_ptr(), w_ih.data_ptr(),
                           w_hh.data_ptr(), out.data_ptr(), seq_len, features, relu, need[0], dx, dh0, dw_ih, dw_hh, db)
    grads = (dx, dh0, dw_ih, dw_hh, db)
    return tuple(torch.from_numpy(g) if wanted else None for g, wanted in zip(grads, need))


# ---------------------------------------------------------------------------------------------
# RNNCell: one step, no sequence. Small steps run as one kernel (input projection included);
# large ones as torch's GEMMs, which use every core (a single step has no rows to split across
# time, and nothing sequential for a kernel to fuse).


def cell(x, h, w_ih, w_hh, b_ih, b_hh, nonlinearity):
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, h, w_ih, w_hh, b_ih, b_hh)):
        return layer(x.unsqueeze(0), h, w_ih, w_hh, b_ih, b_hh, nonlinearity)[1]
    if x.dtype not in _KERNEL_DTYPES:  # complex, float16, bfloat16: the layer's conversions
        return layer(x.unsqueeze(0), h, w_ih, w_hh, b_ih, b_hh, nonlinearity)[1]
    return cell_step(x, h, w_ih, w_hh, b_ih, b_hh, nonlinearity)


def cell_step(x, h, w_ih, w_hh, b_ih, b_hh, nonlinearity):
    """A step that records nothing, checking every argument itself (the kernel reads raw
    memory): TypeError for a non-tensor, a tensor off the CPU, a dtype other than float32 /
    float64 or a mix of them; ValueError for an unknown nonlinearity or shapes that disagree."""
    _start()
    relu = _RELU.get(nonlinearity) if isinstance(nonlinearity, str) else None
    if relu is None:
        raise ValueError(f"numba backend: unknown nonlinearity {nonlinearity!r}")
    bias = b_ih is not None
    if bias != (b_hh is not None):
        raise ValueError("numba backend: b_ih and b_hh must both be given or both be None")
    tensors = (x, h, w_ih, w_hh, b_ih, b_hh) if bias else (x, h, w_ih, w_hh)
    dtype = x.dtype if isinstance(x, Tensor) else None
    if dtype not in _KERNEL_DTYPES:
        raise TypeError("numba backend: the cell runs float32 or float64 tensors")
    for t in tensors:
        if not isinstance(t, Tensor) or t.dtype is not dtype or not t.is_cpu:
            raise TypeError(f"numba backend: the cell runs CPU tensors of one dtype (x is {dtype})")
    batch, features = x.shape if x.dim() == 2 else (-1, -1)
    hidden = w_hh.shape[0] if w_hh.dim() == 2 else -1
    if (h.shape != (batch, hidden) or w_ih.shape != (hidden, features) or w_hh.shape != (hidden, hidden)
            or (bias and (b_ih.shape != (hidden,) or b_hh.shape != (hidden,)))):
        raise ValueError("numba backend: the shapes of the cell's arguments do not agree")
    return _cell_run(x, h, w_ih, w_hh, b_ih, b_hh, relu, batch, features, hidden, dtype)


def _cell_run(x, h, w_ih, w_hh, b_ih, b_hh, relu, batch, features, hidden, dtype):
    """The step itself, on arguments checked by the caller."""
    if batch * hidden * (features + hidden) >= _knobs["numba_cell_gemm_min_work"]:
        return _cell_gemm(x, h, w_ih, w_hh, b_ih, b_hh, relu)
    if b_ih is not None:
        b_ih, b_hh = b_ih.contiguous(), b_hh.contiguous()
    else:
        b_ih = b_hh = torch.zeros(hidden, dtype=dtype)
    # Named, so that every contiguous copy outlives the kernel that reads its address.
    x, h, w_ih, w_hh = x.contiguous(), h.contiguous(), w_ih.contiguous(), w_hh.contiguous()
    out = np.empty((batch, hidden), dtype=_NUMPY_DTYPES[dtype])
    kernels.cell(x.data_ptr(), h.data_ptr(), w_ih.data_ptr(), w_hh.data_ptr(), b_ih.data_ptr(), b_hh.data_ptr(),
                 features, relu, out)
    return torch.from_numpy(out)


def _cell_gemm(x, h, w_ih, w_hh, b_ih, b_hh, relu):
    if b_ih is None:
        out = x @ w_ih.t()
    else:
        out = torch.addmm(b_ih + b_hh, x, w_ih.t())
    out.addmm_(h, w_hh.t())
    kernels.activate(_view(out).reshape(-1), relu)
    return out


_RELU = {"tanh": False, "relu": True}
_NUMPY_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}


# ---------------------------------------------------------------------------------------------
# The modules' usual calls whole (modules.py: RNN.forward and RNNCell.forward, having checked that
# nothing is recorded and autocast is off), as the cpp backend's C++ entries do: the module's
# reshaping and checks here as one test each, then the route its Python path takes from there
# (``stack`` or ``layer``; ``cell``), so the result is the same, bit for bit. At small sizes that
# path's Python costs more than the kernel. Anything else, including every call the path must
# answer with torch.nn's errors, comes back as None, for that path.


def _usual(t, shape, dtype) -> bool:
    """A strided CPU tensor of this shape and dtype, as the kernels take it."""
    return (isinstance(t, Tensor) and t.shape == shape and t.dtype is dtype and t.is_cpu
            and t.layout is torch.strided)


def module_forward(input, hx, weights, num_layers, bidirectional, bias, nonlinearity, batch_first, input_size,
                   hidden_size):
    """``RNN.forward``'s ``(out, h_n)`` for one dense layer in one direction, or ``None``."""
    if (type(num_layers) is not int or num_layers != 1 or bidirectional is not False or type(bias) is not bool
            or type(batch_first) is not bool or type(input_size) is not int or type(hidden_size) is not int
            or type(nonlinearity) is not str or nonlinearity not in _RELU):
        return None
    dim, dtype = input.dim(), input.dtype
    if dim not in (2, 3) or dtype not in _NUMPY_DTYPES or not input.is_cpu or input.layout is not torch.strided:
        return None
    if dim == 2:  # unbatched [T, I], batch_first or not
        x = input.unsqueeze(1)
    else:
        x = input.transpose(0, 1) if batch_first else input
    seq_len, batch, features = x.shape
    if seq_len == 0 or features != input_size or len(weights) != (4 if bias else 2):
        return None
    if hx is None:
        h = torch.zeros(1, batch, hidden_size, dtype=dtype)
    else:
        if hx.dim() != dim:
            return None
        h = hx if dim == 3 else hx.unsqueeze(1)
        if not _usual(h, (1, batch, hidden_size), dtype):
            return None
    for w in weights:
        if not isinstance(w, Tensor) or w.dtype is not dtype or not w.is_cpu:
            return None
    result = _fused_layer(x, h[0], weights, bias, _RELU[nonlinearity])
    if result is None:
        w_ih, w_hh, b_ih, b_hh = weights if bias else (*weights, None, None)
        out, h_n = layer(x, h[0], w_ih, w_hh, b_ih, b_hh, nonlinearity)
        result = out, h_n.unsqueeze(0)
    out, h_n = result
    if dim == 2:
        return out.squeeze(1), h_n.squeeze(1)
    return (out.transpose(0, 1) if batch_first else out), h_n


def cell_module_forward(input, hx, w_ih, w_hh, b_ih, b_hh, nonlinearity, input_size, hidden_size):
    """``RNNCell.forward``'s h', or ``None``."""
    if type(nonlinearity) is not str or type(input_size) is not int or type(hidden_size) is not int:
        return None
    relu = _RELU.get(nonlinearity)
    dim, dtype = input.dim(), input.dtype
    if (relu is None or dim not in (1, 2) or dtype not in _NUMPY_DTYPES or not input.is_cpu
            or input.layout is not torch.strided):
        return None
    x = input if dim == 2 else input.unsqueeze(0)
    batch, features = x.shape
    if features != input_size:
        return None
    if hx is None:
        h = torch.zeros(batch, hidden_size, dtype=dtype)
    else:
        if hx.dim() != dim:
            return None
        h = hx if dim == 2 else hx.unsqueeze(0)
    shape = (hidden_size,)
    if (not _usual(h, (batch, hidden_size), dtype) or not _usual(w_ih, (hidden_size, features), dtype)
            or not _usual(w_hh, (hidden_size, hidden_size), dtype) or (b_ih is None) != (b_hh is None)
            or (b_ih is not None and not (_usual(b_ih, shape, dtype) and _usual(b_hh, shape, dtype)))):
        return None
    if torch.is_grad_enabled() and (input.requires_grad or h.requires_grad or w_ih.requires_grad
                                    or w_hh.requires_grad or (b_ih is not None and (b_ih.requires_grad
                                                                                    or b_hh.requires_grad))):
        y = layer(x.unsqueeze(0), h, w_ih, w_hh, b_ih, b_hh, nonlinearity)[1]
    else:
        _start()
        y = _cell_run(x, h, w_ih, w_hh, b_ih, b_hh, relu, batch, features, hidden_size, dtype)
    return y if dim == 2 else y.squeeze(0)


# ---------------------------------------------------------------------------------------------
# Compile once, measure it, report it.

_compile_info: dict | None = None


def warm_up() -> dict:
    """Compile (or load from the disk cache) every kernel for float32 and float64, once per
    process, and say how long that took and whether the cache served it."""
    global _compile_info
    if _compile_info is not None:
        return _compile_info
    _start()
    start = time.perf_counter()
    compiled = (kernels.forward_rows, kernels.forward_parallel, kernels.forward_gemm, kernels.forward_columns,
                kernels.backward_rows, kernels.backward_parallel, kernels.backward_gemm, kernels.backward_columns,
                kernels.cell, kernels.activate,
                kernels.layer_forward, kernels.layer_forward_parallel, kernels.layer_backward)
    plan = _plan([1, 1])
    for dtype in (np.float32, np.float64):
        out, h0, h_n, w = (np.zeros(s, dtype) for s in ((2, 1), (1, 1), (1, 1), (1, 1)))
        args = (*plan, False)
        for gemm in (False, True):
            kernels.forward_parallel(out, h0, w, *args, h_n, 1, gemm, h0.copy())
            kernels.backward_parallel(out.copy(), out, h0, out, w, *args, 1, gemm, h0.copy())
        kernels.forward_rows(out, h0, w, *args, 0, 1, h_n)
        kernels.forward_gemm(out, h0, w, *args, 0, 1, h_n, h0.copy())
        kernels.backward_rows(out.copy(), out, h0, out, w, *args, 0, 1)
        kernels.backward_gemm(out.copy(), out, h0, out, w, *args, 0, 1, h0.copy())
        blocks = np.zeros((1, 1, 1), dtype)
        kernels.forward_columns(out, h0, blocks, *args, h_n, blocks.copy())
        kernels.backward_columns(out.copy(), out, h0, out, blocks, *args, blocks.copy())
        address = w.ctypes.data  # every operand 1 x 1
        kernels.cell(address, address, address, address, address, address, 1, False, h_n)
        kernels.activate(h_n.reshape(-1), False)
        fused = (address, address, address, address, address, address, True, 1, False)
        kernels.layer_forward(*fused, h_n, h0)
        kernels.layer_forward_parallel(*fused, h_n, h0, 1)
        kernels.layer_backward(address, address, address, address, address, address, address, 1, 1, False, True,
                               h0.copy(), h0.copy(), h0.copy(), h0.copy(), h0[0].copy())
    hits = sum(sum(k.stats.cache_hits.values()) for k in compiled)
    misses = sum(sum(k.stats.cache_misses.values()) for k in compiled)
    _compile_info = {
        "seconds": round(time.perf_counter() - start, 3),
        "cache_hits": hits,
        "cache_misses": misses,
        "cache_dir": kernels.forward_rows._cache._cache_path,
        "threading_layer": _threading_layer(),
        "threads": numba.get_num_threads(),
    }
    return _compile_info


def _threading_layer() -> str | None:
    try:
        return numba.threading_layer()
    except ValueError:  # no parallel kernel has launched yet
        return None
