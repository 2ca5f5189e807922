"""``numba``: the recurrence as ``@njit`` kernels over zero-copy NumPy views of the tensors.

Where a time step happens: :func:`_forward_rows` / :func:`_backward_rows` (hand loops, a slice
of the batch rows across the whole sequence, so threads need no per-step sync) or, once the
hidden size makes each step a real GEMM, :func:`_forward_blas` / :func:`_backward_blas` (one
``np.dot`` a step, which Numba lowers to SciPy's BLAS).

Torch does what is not sequential: the input projection of every step is one GEMM before the
forward kernel, and the gradients of the input, the weights and the biases are single GEMMs
after the backward kernel. The kernels write into preallocated outputs and allocate nothing per
step. Only the outputs are saved for the backward; the derivative of the nonlinearity is taken
from them.

Compiled code is cached on disk (``cache=True``: ``__pycache__`` beside this file, or Numba's
user-wide cache directory when that is not writable, or ``NUMBA_CACHE_DIR``), so only the first
process pays the JIT. Threads: see :func:`_threads`.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np
import torch
from torch import Tensor

from . import _torch
from ._common import as_rows, check_layer_args, function_grads, gemm_grads, input_projection, like_input, needed_grads

DEVICE_TYPES = ("cpu",)

try:
    import numba
    import numba.extending
    from numba import njit, prange
except ImportError as exc:  # the backend reports itself unavailable; nothing below runs
    numba = None
    _import_error = str(exc)

    def njit(*args, **kwargs):
        return (lambda f: f) if not args or not callable(args[0]) else args[0]

    prange = range
else:
    # Numba picks its threading layer once, at its first parallel launch. torch's CPU wheels run
    # ATen on GNU OpenMP; Numba's "omp" layer on the same libgomp reuses that runtime's thread
    # pool instead of starting a second pool (TBB's, or workqueue's) that would compete with it
    # for the cores. Only when the user has chosen no layer; in this process only.
    if not {"NUMBA_THREADING_LAYER", "NUMBA_THREADING_LAYER_PRIORITY"} & set(os.environ):
        if "ATen parallel backend: OpenMP" in torch.__config__.parallel_info():
            numba.config.THREADING_LAYER_PRIORITY = ["omp", "tbb", "workqueue"]
    # The per-step np.dot runs inside the kernels' own prange over batch rows, so SciPy's OpenBLAS
    # needs no threads of its own; left with them, its workers busy-wait after every call and
    # take a core from whatever runs next (measured: torch.nn.RNN and the cpp backend ran 2x
    # slower in a process that had run this backend at H >= 128). Only if SciPy's BLAS is not
    # loaded yet and the user set nothing: OpenBLAS reads this when it loads.
    if "scipy.linalg" not in sys.modules:
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def unavailable_reason() -> str | None:
    if numba is None:
        return f"Numba does not import ({_import_error}); install it with `pip install numba scipy`"
    try:
        import scipy.linalg.cython_blas  # noqa: F401  (Numba's np.dot calls BLAS through SciPy)
    except ImportError as exc:
        return f"SciPy, whose BLAS Numba's np.dot uses, does not import ({exc}); `pip install scipy`"
    return None


# Multiply-adds per step above which the per-step GEMM goes to BLAS; below it the hand loops win
# (no call overhead, the weights stay in L1/L2).
_BLAS_MIN_HIDDEN = 128
# Work (row-steps x H^2 multiply-adds) below which a second thread costs more than it saves.
_PARALLEL_MIN_WORK = 200_000
_PARALLEL_MIN_ROWS = 4

# contract: fused multiply-add; reassoc: vectorized dot products. No "nnan"/"ninf": NaN and Inf
# must propagate as in torch.
_FASTMATH = {"contract", "reassoc", "arcp"}
_KERNEL = dict(nogil=True, cache=True, fastmath=_FASTMATH)

# float32 tanh(x) = x P(x^2) / Q(x^2), evaluated in float64 on |x| <= 9.5 and rounded once; the
# (5, 5) rational was fitted for this file (Lawson-weighted least squares on the relative error)
# to 7e-11. Rounded to float32 it is within one ulp of torch.tanh, also near +-1, where the
# backward's 1 - y^2 is sensitive to the last ulp; and unlike libm's tanhf it vectorizes. Beyond
# |x| = 9.5, float32 tanh is +-1.
_P = (0.9999999999296627, 0.14081560269906981, 0.004402441034271077, 4.16691571578883e-05,
      1.0772382183204926e-07, 3.4612611349946854e-11)
_Q = (1.0, 0.474148935287633, 0.029118754106624848, 0.00049631543451014, 2.5478057929012645e-06,
      2.823791275376577e-09)
_P0, _P1, _P2, _P3, _P4, _P5 = _P
_Q0, _Q1, _Q2, _Q3, _Q4, _Q5 = _Q
_CLAMP = 9.5


@njit(inline="always", **_KERNEL)
def _tanh32(x):
    z = np.float64(x)
    if z > _CLAMP:  # comparisons are false for NaN, which passes through
        z = _CLAMP
    elif z < -_CLAMP:
        z = -_CLAMP
    s = z * z
    p = ((((_P5 * s + _P4) * s + _P3) * s + _P2) * s + _P1) * s + _P0
    q = ((((_Q5 * s + _Q4) * s + _Q3) * s + _Q2) * s + _Q1) * s + _Q0
    y = z * p / q
    if y > 1.0:
        y = 1.0
    elif y < -1.0:
        y = -1.0
    return np.float32(y)


def _tanh(x):
    """float32: the rational above; float64: libm's tanh (chosen when the kernel compiles)."""
    return np.tanh(x)


if numba is not None:

    @numba.extending.overload(_tanh, inline="always")
    def _tanh_for(x):
        if x == numba.types.float32:
            return lambda x: _tanh32(x)
        return lambda x: np.tanh(x)


@njit(inline="always", **_KERNEL)
def _activate(row, relu):
    """The nonlinearity in place over one row."""
    if relu:
        for j in range(row.shape[0]):
            if row[j] < 0:  # keeps NaN, as torch.relu does
                row[j] = 0
    else:
        for j in range(row.shape[0]):
            row[j] = _tanh(row[j])


@njit(inline="always", **_KERNEL)
def _final_states(out, h0, sizes, offsets, lo, hi, h_n):
    """h_n[b] for rows lo..hi: the output of each row's last step (sizes are non-increasing)."""
    t = sizes.shape[0] - 1
    for b in range(lo, hi):  # rows in order end no later than the rows before them
        while t >= 0 and sizes[t] <= b:
            t -= 1
        h_n[b] = out[offsets[t] + b] if t >= 0 else h0[b]


@njit(**_KERNEL)
def _forward_rows(out, h0, w, sizes, offsets, relu, lo, hi, h_n):
    """Rows lo..hi of the whole sequence. ``out`` holds the input projection (bias included) and
    becomes the output: out[t, b] = act(out[t, b] + h_{t-1}[b] . w[j]) for every j."""
    hidden = out.shape[1]
    for t in range(sizes.shape[0]):
        end = min(hi, sizes[t])
        if end <= lo:
            break
        prev = h0 if t == 0 else out[offsets[t - 1] :]
        cur = out[offsets[t] :]
        for b in range(lo, end):
            h = prev[b]
            y = cur[b]
            for j in range(hidden):
                wj = w[j]
                acc = y[j]
                for k in range(hidden):
                    acc += h[k] * wj[k]
                y[j] = acc
            _activate(y, relu)
    _final_states(out, h0, sizes, offsets, lo, hi, h_n)


@njit(parallel=True, **_KERNEL)
def _forward_parallel(out, h0, w, sizes, offsets, relu, h_n, chunks):
    batch = h0.shape[0]
    for c in prange(chunks):
        _forward_rows(out, h0, w, sizes, offsets, relu, c * batch // chunks, (c + 1) * batch // chunks, h_n)


@njit(**_KERNEL)
def _forward_blas(out, h0, wt, sizes, offsets, relu, h_n, scratch):
    """The same recurrence with each step's h_{t-1} @ W_hh^T as one BLAS GEMM into ``scratch``."""
    for t in range(sizes.shape[0]):
        n = sizes[t]
        prev = h0[:n] if t == 0 else out[offsets[t - 1] : offsets[t - 1] + n]
        acc = scratch[:n]
        np.dot(prev, wt, acc)
        cur = out[offsets[t] : offsets[t] + n]
        for b in range(n):
            y = cur[b]
            a = acc[b]
            for j in range(y.shape[0]):
                y[j] += a[j]
            _activate(y, relu)
    _final_states(out, h0, sizes, offsets, 0, h0.shape[0], h_n)


@njit(inline="always", **_KERNEL)
def _times_dact(g, y, relu):
    """dz = g * act'(z), the derivative written in terms of the output y = act(z)."""
    if relu:
        for j in range(g.shape[0]):
            if y[j] <= 0:  # torch's threshold_backward: NaN outputs let the gradient through
                g[j] = 0
    else:
        for j in range(g.shape[0]):
            g[j] *= 1 - y[j] * y[j]


@njit(**_KERNEL)
def _backward_rows(dz, grad_out, grad_h_n, out, wt, sizes, offsets, relu, lo, hi):
    """Reverse recurrence for rows lo..hi: dz_t = (grad_out_t + dz_{t+1} @ W_hh) * act'(z_t),
    with grad_h_n in place of dz_{t+1} @ W_hh for a row whose sequence ends at step t."""
    hidden = dz.shape[1]
    steps = sizes.shape[0]
    for t in range(steps - 1, -1, -1):
        end = min(hi, sizes[t])
        if end <= lo:
            continue
        following = min(end, sizes[t + 1]) if t + 1 < steps else lo
        base = offsets[t]
        nxt = dz[offsets[t + 1] :] if t + 1 < steps else dz
        for b in range(lo, end):
            g = dz[base + b]
            go = grad_out[base + b]
            if b < following:
                d = nxt[b]
                for j in range(hidden):
                    wj = wt[j]
                    acc = go[j]
                    for k in range(hidden):
                        acc += d[k] * wj[k]
                    g[j] = acc
            else:
                hn = grad_h_n[b]
                for j in range(hidden):
                    g[j] = go[j] + hn[j]
            _times_dact(g, out[base + b], relu)


@njit(parallel=True, **_KERNEL)
def _backward_parallel(dz, grad_out, grad_h_n, out, wt, sizes, offsets, relu, chunks):
    batch = grad_h_n.shape[0]
    for c in prange(chunks):
        _backward_rows(dz, grad_out, grad_h_n, out, wt, sizes, offsets, relu, c * batch // chunks, (c + 1) * batch // chunks)


@njit(**_KERNEL)
def _backward_blas(dz, grad_out, grad_h_n, out, w, sizes, offsets, relu, scratch):
    """The reverse recurrence with each step's dz_{t+1} @ W_hh as one BLAS GEMM."""
    steps = sizes.shape[0]
    for t in range(steps - 1, -1, -1):
        n = sizes[t]
        following = sizes[t + 1] if t + 1 < steps else 0
        if following:
            np.dot(dz[offsets[t + 1] : offsets[t + 1] + following], w, scratch[:following])
        base = offsets[t]
        for b in range(n):
            g = dz[base + b]
            go = grad_out[base + b]
            src = scratch[b] if b < following else grad_h_n[b]
            for j in range(g.shape[0]):
                g[j] = go[j] + src[j]
            _times_dact(g, out[base + b], relu)


# ---------------------------------------------------------------------------------------------
# Python side: validation, threads, autograd.


def _threads(rows: int, work: int) -> int:
    """How many row chunks run in parallel: as many as torch's intra-op threads (the same pool
    under the omp layer), never more than Numba started, one when the work is too small for a
    second thread to pay off. Set per call because ``torch.set_num_threads`` may have changed."""
    if work < _PARALLEL_MIN_WORK:
        return 1
    n = min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS, rows // _PARALLEL_MIN_ROWS)
    return max(n, 1)


def _plan(batch_sizes: list[int]) -> tuple[np.ndarray, np.ndarray]:
    sizes = np.asarray(batch_sizes, dtype=np.int64)
    offsets = np.zeros(len(batch_sizes), dtype=np.int64)
    np.cumsum(sizes[:-1], out=offsets[1:])
    return sizes, offsets


def _view(t: Tensor) -> np.ndarray:
    return t.detach().numpy()


class _Layer(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows, h0, w_ih, w_hh, b_ih, b_hh, batch_sizes, relu):
        out = input_projection(rows, w_ih, b_ih, b_hh).contiguous()  # the kernels add the rest
        h0c = h0.contiguous()
        h_n = torch.empty_like(h0c)
        sizes, offsets = _plan(batch_sizes)
        hidden = w_hh.shape[0]
        if hidden >= _BLAS_MIN_HIDDEN:
            scratch = np.empty((h0.shape[0], hidden), dtype=_view(out).dtype)
            wt = w_hh.t().contiguous()
            _forward_blas(_view(out), _view(h0c), _view(wt), sizes, offsets, relu, _view(h_n), scratch)
        else:
            w = _view(w_hh.contiguous())
            chunks = _threads(h0.shape[0], out.shape[0] * hidden * hidden)
            if chunks > 1:
                numba.set_num_threads(chunks)
                _forward_parallel(_view(out), _view(h0c), w, sizes, offsets, relu, _view(h_n), chunks)
            else:
                _forward_rows(_view(out), _view(h0c), w, sizes, offsets, relu, 0, h0.shape[0], _view(h_n))

        ctx.save_for_backward(rows, h0, w_ih, w_hh, out)
        ctx.batch_sizes, ctx.plan, ctx.relu, ctx.has_bias = batch_sizes, (sizes, offsets), relu, b_ih is not None
        return out, h_n

    @staticmethod
    def backward(ctx, grad_out, grad_h_n):
        rows, h0, w_ih, w_hh, out = ctx.saved_tensors
        need = needed_grads(ctx)
        if torch.is_grad_enabled():
            # create_graph: the backward must itself be differentiable, and the torch backend's
            # is (the cpp backend does the same).
            grads = _torch.layer_backward(grad_out, grad_h_n, rows, h0, w_ih, w_hh, out, ctx.batch_sizes, ctx.relu, need)
        else:
            dz = _reverse_recurrence(ctx.plan, ctx.relu, grad_out, grad_h_n, w_hh, out)
            grads = gemm_grads(dz, rows, h0, w_ih, w_hh, out, ctx.batch_sizes, need)
        return function_grads(grads)


def _reverse_recurrence(plan, relu, grad_out, grad_h_n, w_hh, out) -> Tensor:
    """dz, the gradient of every row's pre-activation, from the backward kernels."""
    sizes, offsets = plan
    batch, hidden = grad_h_n.shape
    grad_out = grad_out.contiguous()
    grad_h_n = grad_h_n.contiguous()
    dz = torch.empty_like(out)
    if hidden >= _BLAS_MIN_HIDDEN:
        scratch = np.empty((batch, hidden), dtype=_view(out).dtype)
        _backward_blas(_view(dz), _view(grad_out), _view(grad_h_n), _view(out), _view(w_hh.contiguous()),
                       sizes, offsets, relu, scratch)
    else:
        wt = _view(w_hh.t().contiguous())
        chunks = _threads(batch, out.shape[0] * hidden * hidden)
        if chunks > 1:
            numba.set_num_threads(chunks)
            _backward_parallel(_view(dz), _view(grad_out), _view(grad_h_n), _view(out), wt, sizes, offsets, relu, chunks)
        else:
            _backward_rows(_view(dz), _view(grad_out), _view(grad_h_n), _view(out), wt, sizes, offsets, relu, 0, batch)
    return dz


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
    rows, batch_sizes = as_rows(x, batch_sizes)  # a list from here on
    out, h_n = _Layer.apply(rows, h0, w_ih, w_hh, b_ih, b_hh, batch_sizes, nonlinearity == "relu")
    return like_input(out, x), h_n


# ---------------------------------------------------------------------------------------------
# Compile once, measure it, report it.

_compile_info: dict | None = None


def warm_up() -> dict:
    """Compile (or load from the disk cache) every kernel for float32 and float64, once per
    process, and say how long that took and whether the cache served it."""
    global _compile_info
    if _compile_info is not None:
        return _compile_info
    start = time.perf_counter()
    kernels = (_forward_rows, _forward_parallel, _forward_blas, _backward_rows, _backward_parallel,
               _backward_blas)
    for dtype in (np.float32, np.float64):
        out, h0, h_n, w = (np.zeros(s, dtype) for s in ((2, 1), (1, 1), (1, 1), (1, 1)))
        sizes, offsets = _plan([1, 1])
        args = (sizes, offsets, False)
        _forward_rows(out, h0, w, *args, 0, 1, h_n)
        _forward_parallel(out, h0, w, *args, h_n, 1)
        _forward_blas(out, h0, w, *args, h_n, h0.copy())
        _backward_rows(out.copy(), out, h0, out, w, *args, 0, 1)
        _backward_parallel(out.copy(), out, h0, out, w, *args, 1)
        _backward_blas(out.copy(), out, h0, out, w, *args, h0.copy())
    hits = sum(sum(k.stats.cache_hits.values()) for k in kernels)
    misses = sum(sum(k.stats.cache_misses.values()) for k in kernels)
    _compile_info = {
        "seconds": round(time.perf_counter() - start, 3),
        "cache_hits": hits,
        "cache_misses": misses,
        "cache_dir": _forward_rows._cache._cache_path,
        "threading_layer": _threading_layer(),
        "threads": numba.get_num_threads(),
    }
    return _compile_info


def _threading_layer() -> str | None:
    try:
        return numba.threading_layer()
    except ValueError:  # no parallel kernel has launched yet
        return None
