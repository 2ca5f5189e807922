"""The numba backend's ``@njit`` kernels, and nothing else: where a time step happens.

Two ways through the sequence, for the forward and for the backward:

- :func:`forward_rows` / :func:`backward_rows`: hand loops over a slice of the batch rows across
  the whole sequence, so the threads of :func:`forward_parallel` / :func:`backward_parallel`, each
  owning its rows, need no per-step sync; W_hh stays in L1/L2 and no call is paid per step.
- :func:`forward_gemm` / :func:`backward_gemm`: each step's product with W_hh as one ``np.dot``,
  which Numba lowers to SciPy's BLAS; it wins once the hidden size makes that product a real GEMM.
  The parallel kernels run these on row chunks too, each thread's BLAS call on its own rows.

:func:`cell` is one step of ``RNNCell`` with no sequence around it, input projection included.

Arguments are NumPy views of contiguous tensors: ``out`` / ``dz`` ``[N, H]`` in packed rows,
``batch_sizes`` (int64, rows per step, non-increasing) and ``offsets`` (int64, each step's first
row). The kernels write into preallocated outputs and allocate nothing per step. ``_numba``
validates every argument before any kernel runs: the loops do not check bounds.

Compiled code is cached on disk (``cache=True``: ``__pycache__`` beside this file, or Numba's
user-wide cache directory when that is not writable, or ``NUMBA_CACHE_DIR``), so only the first
process pays the JIT.
"""

from __future__ import annotations

import numba
import numba.extending
import numpy as np
from numba import njit, prange
from numba.core import cgutils, types
from numba.extending import intrinsic

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
def _final_states(out, h0, batch_sizes, offsets, lo, hi, h_n):
    """h_n[b] for rows lo..hi: the output of each row's last step (batch_sizes is non-increasing)."""
    t = batch_sizes.shape[0] - 1
    for b in range(lo, hi):  # rows in order end no later than the rows before them
        while t >= 0 and batch_sizes[t] <= b:
            t -= 1
        h_n[b] = out[offsets[t] + b] if t >= 0 else h0[b]


@njit(**_KERNEL)
def forward_rows(out, h0, w, batch_sizes, offsets, relu, lo, hi, h_n):
    """Rows lo..hi of the whole sequence. ``out`` holds the input projection (bias included) and
    becomes the output: out[t, b] = act(out[t, b] + h_{t-1}[b] . w[j]) for every j."""
    hidden = out.shape[1]
    for t in range(batch_sizes.shape[0]):
        end = min(hi, batch_sizes[t])
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
    _final_states(out, h0, batch_sizes, offsets, lo, hi, h_n)


@njit(parallel=True, **_KERNEL)
def forward_parallel(out, h0, w, batch_sizes, offsets, relu, h_n, chunks, gemm, scratch):
    """Chunks of batch rows in parallel, each through the whole sequence: a row's steps depend on
    its own previous state only, so the threads never wait for each other. ``gemm``: each chunk
    runs :func:`forward_gemm` (``w`` is W_hh^T), whose per-step BLAS call then stays on its own
    thread while every core works; otherwise :func:`forward_rows` (``w`` is W_hh)."""
    batch = h0.shape[0]
    for c in prange(chunks):
        lo, hi = c * batch // chunks, (c + 1) * batch // chunks
        if gemm:
            forward_gemm(out, h0, w, batch_sizes, offsets, relu, lo, hi, h_n, scratch)
        else:
            forward_rows(out, h0, w, batch_sizes, offsets, relu, lo, hi, h_n)


@njit(**_KERNEL)
def forward_gemm(out, h0, wt, batch_sizes, offsets, relu, lo, hi, h_n, scratch):
    """The same recurrence for rows lo..hi with each step's h_{t-1} @ W_hh^T as one BLAS GEMM
    into the same rows of ``scratch``."""
    for t in range(batch_sizes.shape[0]):
        end = min(hi, batch_sizes[t])
        if end <= lo:
            break
        prev = h0[lo:end] if t == 0 else out[offsets[t - 1] + lo : offsets[t - 1] + end]
        acc = scratch[lo:end]
        np.dot(prev, wt, acc)
        cur = out[offsets[t] + lo : offsets[t] + end]
        for b in range(end - lo):
            y = cur[b]
            a = acc[b]
            for j in range(y.shape[0]):
                y[j] += a[j]
            _activate(y, relu)
    _final_states(out, h0, batch_sizes, offsets, lo, hi, h_n)


@intrinsic
def _address(typingctx, address):
    """The integer ``address`` (a tensor's data_ptr()) as a pointer for :func:`numba.carray`."""

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], cgutils.voidptr_t)

    return types.voidptr(types.intp), codegen


@njit(**_KERNEL)
def cell(x_at, h_at, w_ih_at, w_hh_at, b_ih_at, b_hh_at, features, relu, out):
    """One step without a sequence around it, the input projection included (a separate GEMM
    and its call would cost more than a small step): out = act(x W_ih^T + b_ih + h W_hh^T + b_hh).

    The operands come as the addresses of contiguous CPU tensors, checked by the caller, of
    ``out``'s dtype and of shapes x [B, I], h [B, H], w_ih [H, I], w_hh [H, H], biases [H]:
    converting six tensors to NumPy would cost several times a small step's arithmetic."""
    batch, hidden = out.shape
    dtype = out.dtype
    x = numba.carray(_address(x_at), (batch, features), dtype)
    h = numba.carray(_address(h_at), (batch, hidden), dtype)
    w_ih = numba.carray(_address(w_ih_at), (hidden, features), dtype)
    w_hh = numba.carray(_address(w_hh_at), (hidden, hidden), dtype)
    b_ih = numba.carray(_address(b_ih_at), (hidden,), dtype)
    b_hh = numba.carray(_address(b_hh_at), (hidden,), dtype)
    for b in range(batch):
        xb = x[b]
        hb = h[b]
        y = out[b]
        for j in range(hidden):
            wi = w_ih[j]
            acc = b_ih[j]
            for k in range(features):
                acc += xb[k] * wi[k]
            wh = w_hh[j]
            part = b_hh[j]
            for k in range(hidden):
                part += hb[k] * wh[k]
            y[j] = acc + part
        _activate(y, relu)


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
def backward_rows(dz, grad_out, grad_h_n, out, wt, batch_sizes, offsets, relu, lo, hi):
    """Reverse recurrence for rows lo..hi: dz_t = (grad_out_t + dz_{t+1} @ W_hh) * act'(z_t),
    with grad_h_n in place of dz_{t+1} @ W_hh for a row whose sequence ends at step t."""
    hidden = dz.shape[1]
    seq_len = batch_sizes.shape[0]
    for t in range(seq_len - 1, -1, -1):
        end = min(hi, batch_sizes[t])
        if end <= lo:
            continue
        following = min(end, batch_sizes[t + 1]) if t + 1 < seq_len else lo
        base = offsets[t]
        nxt = dz[offsets[t + 1] :] if t + 1 < seq_len else dz
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


@njit(**_KERNEL)
def backward_gemm(dz, grad_out, grad_h_n, out, w, batch_sizes, offsets, relu, lo, hi, scratch):
    """The reverse recurrence for rows lo..hi with each step's dz_{t+1} @ W_hh as one BLAS GEMM
    into the same rows of ``scratch``."""
    seq_len = batch_sizes.shape[0]
    for t in range(seq_len - 1, -1, -1):
        end = min(hi, batch_sizes[t])
        if end <= lo:
            continue
        following = min(end, batch_sizes[t + 1]) if t + 1 < seq_len else lo
        if following > lo:
            np.dot(dz[offsets[t + 1] + lo : offsets[t + 1] + following], w, scratch[lo:following])
        base = offsets[t]
        for b in range(lo, end):
            g = dz[base + b]
            go = grad_out[base + b]
            src = scratch[b] if b < following else grad_h_n[b]
            for j in range(g.shape[0]):
                g[j] = go[j] + src[j]
            _times_dact(g, out[base + b], relu)


@njit(parallel=True, **_KERNEL)
def backward_parallel(dz, grad_out, grad_h_n, out, w, batch_sizes, offsets, relu, chunks, gemm, scratch):
    """Chunks of batch rows in parallel, as :func:`forward_parallel` (``w`` is W_hh for
    ``gemm``, W_hh^T for the hand loops)."""
    batch = grad_h_n.shape[0]
    for c in prange(chunks):
        lo, hi = c * batch // chunks, (c + 1) * batch // chunks
        if gemm:
            backward_gemm(dz, grad_out, grad_h_n, out, w, batch_sizes, offsets, relu, lo, hi, scratch)
        else:
            backward_rows(dz, grad_out, grad_h_n, out, w, batch_sizes, offsets, relu, lo, hi)
