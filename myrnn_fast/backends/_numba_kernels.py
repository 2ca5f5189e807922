"""The numba backend's ``@njit`` kernels, and nothing else: where a time step happens.

Two ways through the sequence, for the forward and for the backward:

- :func:`forward_rows` / :func:`backward_rows`: a slice of the batch rows across the whole
  sequence, each step as register tiles (:func:`_step`, over the SIMD vectors below), so the
  threads of :func:`forward_parallel` / :func:`backward_parallel`, each owning its rows, need no
  per-step sync; W_hh stays in L1/L2 and no call is paid per step.
- :func:`forward_gemm` / :func:`backward_gemm`: each step's product with W_hh as one ``np.dot``,
  which Numba lowers to SciPy's BLAS; it wins once the hidden size makes that product a real GEMM.
  The parallel kernels run these on row chunks too, each thread's BLAS call on its own rows;
  :func:`forward_columns` / :func:`backward_columns` split each step's product by columns of
  W_hh instead, a block a thread, and join the threads every step (``_numba`` measures which).

:func:`cell` is one step of ``RNNCell`` with no sequence around it, input projection included;
:func:`layer_forward` / :func:`layer_backward` a whole small dense layer, each pass in one call.

Arguments are NumPy views of contiguous tensors: ``out`` / ``dz`` ``[N, H]`` in packed rows,
``batch_sizes`` (int64, rows per step, non-increasing) and ``offsets`` (int64, each step's first
row). The kernels write into preallocated outputs and allocate nothing per step. ``_numba``
validates every argument before any kernel runs: the loops do not check bounds.

Compiled code is cached on disk (``cache=True``: ``__pycache__`` beside this file, or Numba's
user-wide cache directory when that is not writable, or ``NUMBA_CACHE_DIR``), so only the first
process pays the JIT.
"""

from __future__ import annotations

import math

import llvmlite.binding
import numba
import numba.extending
import numpy as np
from llvmlite import ir
from numba import njit, prange
from numba.core import cgutils, types
from numba.extending import intrinsic, models, register_model

# contract: fused multiply-add; reassoc: vectorized dot products. No "nnan"/"ninf": NaN and Inf
# must propagate as in torch.
_FASTMATH = {"contract", "reassoc", "arcp"}
# error_model="numpy": a float division is IEEE's, not a branch that may raise
# ZeroDivisionError, which kept every loop with a division from vectorizing.
_KERNEL = dict(nogil=True, cache=True, fastmath=_FASTMATH, error_model="numpy")

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


# ---------------------------------------------------------------------------------------------
# SIMD vectors. Numba has no vector type, and LLVM does not keep hand-looped accumulators in
# registers (the rows it would accumulate into may alias the rows it reads). So the kernels hold
# their accumulators as LLVM vectors of the host's widest register (64 bytes with AVX-512, else
# 32: 16 or 8 float32 lanes, 8 or 4 float64), through the few operations below. A vector wider
# than the registers LLVM splits, and a 4-row, 2-vector tile's eight accumulators then took all
# of AVX2's sixteen registers before its loads (the article's forward kernel ran 11% slower).
# Loads and stores take a flat element index into a 1-D C-contiguous array and check nothing:
# the callers keep in bounds.


class _Vec(types.Type):
    def __init__(self, dtype):
        self.dtype = dtype
        self.lanes = _LANES[dtype]
        super().__init__(name=f"vec({dtype} x {self.lanes})")


_VECTOR_BYTES = 64 if llvmlite.binding.get_host_cpu_features().get("avx512f", False) else 32
_LANES = {types.float32: _VECTOR_BYTES // 4, types.float64: _VECTOR_BYTES // 8}


@register_model(_Vec)
class _VecModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, ir.VectorType(dmm.lookup(fe_type.dtype).get_value_type(), fe_type.lanes))


def _element_pointer(context, builder, arytype, ary, index):
    data = context.make_array(arytype)(context, builder, ary).data
    return builder.gep(data, [index], inbounds=True)


@intrinsic
def _lanes(typingctx, ary):
    """How many lanes a vector of ``ary``'s dtype has (a compile-time constant)."""
    lanes = _LANES[ary.dtype]
    return types.intp(ary), lambda context, builder, sig, args: context.get_constant(types.intp, lanes)


@intrinsic
def _vload(typingctx, ary, index):
    """ary[index : index + lanes] as a vector."""
    vec = _Vec(ary.dtype)

    def codegen(context, builder, sig, args):
        ptr = _element_pointer(context, builder, sig.args[0], args[0], args[1])
        vtype = context.get_value_type(vec)
        return builder.load(builder.bitcast(ptr, vtype.as_pointer()), align=ary.dtype.bitwidth // 8, typ=vtype)

    return vec(ary, types.intp), codegen


@intrinsic
def _vstore(typingctx, ary, index, value):
    """ary[index : index + lanes] = value."""

    def codegen(context, builder, sig, args):
        ptr = _element_pointer(context, builder, sig.args[0], args[0], args[1])
        builder.store(args[2], builder.bitcast(ptr, args[2].type.as_pointer()), align=ary.dtype.bitwidth // 8)
        return context.get_dummy_value()

    return types.none(ary, types.intp, value), codegen


@intrinsic
def _vbroadcast(typingctx, ary, index):
    """ary[index] in every lane."""
    vec = _Vec(ary.dtype)

    def codegen(context, builder, sig, args):
        ptr = _element_pointer(context, builder, sig.args[0], args[0], args[1])
        vtype = context.get_value_type(vec)
        scalar = builder.load(ptr, typ=vtype.element)
        return _splat(builder, vtype, scalar)

    return vec(ary, types.intp), codegen


def _splat(builder, vtype, scalar):
    one = builder.insert_element(ir.Constant(vtype, ir.Undefined), scalar, ir.Constant(ir.IntType(32), 0))
    return builder.shuffle_vector(one, ir.Constant(vtype, ir.Undefined),
                                  ir.Constant(ir.VectorType(ir.IntType(32), vtype.count), [0] * vtype.count))


def _intrinsic_name(base, vtype):
    bits = 64 if isinstance(vtype.element, ir.DoubleType) else 32
    return f"{base}.v{vtype.count}f{bits}"


@intrinsic
def _vfma(typingctx, a, b, c):
    """a * b + c, fused (one rounding), lane by lane."""

    def codegen(context, builder, sig, args):
        vtype = args[0].type
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vtype, [vtype] * 3),
                                            _intrinsic_name("llvm.fma", vtype))
        return builder.call(fn, args)

    return a(a, b, c), codegen


def _vconst(vtype, value):
    return ir.Constant(vtype, [ir.Constant(vtype.element, value)] * vtype.count)


@intrinsic
def _vrelu(typingctx, v):
    """max(v, 0) lane by lane, NaN kept (``v < 0`` is false for NaN), as torch.relu."""

    def codegen(context, builder, sig, args):
        (v,) = args
        zero = _vconst(v.type, 0.0)
        return builder.select(builder.fcmp_ordered("<", v, zero), zero, v)

    return v(v), codegen


@intrinsic
def _vtanh(typingctx, v):
    """tanh lane by lane. float32: sign(x) (1 - e) / (1 + e) with e = exp(-2|x|) in float32
    vectors, and an odd Taylor series below |x| = 1/4, where 1 - e would cancel (the cpp
    kernels' tanh_vec, csrc/kernels/cpu/rnn_cpu_kernels.cpp); NaN stays NaN, +-Inf gives +-1.
    float64: libm's tanh one lane at a time (float64 is for checking, not for speed)."""

    def codegen(context, builder, sig, args):
        (x,) = args
        vtype = x.type
        if sig.args[0].dtype == types.float64:
            tanh = context.get_function(math.tanh, types.float64(types.float64))
            for lane in range(vtype.count):
                index = ir.Constant(ir.IntType(32), lane)
                x = builder.insert_element(x, tanh(builder, [builder.extract_element(x, index)]), index)
            return x
        fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vtype, [vtype] * 3),
                                             _intrinsic_name("llvm.fma", vtype))
        ints = ir.VectorType(ir.IntType(32), vtype.count)

        def c(value):
            return _vconst(vtype, value)

        def horner(t, coefficients):  # coefficients from the highest power down
            p = c(coefficients[0])
            for k in coefficients[1:]:
                p = builder.call(fma, [p, t, c(k)])
            return p

        bits = builder.bitcast(x, ints)
        sign = builder.and_(bits, ir.Constant(ints, [ir.Constant(ir.IntType(32), -(1 << 31))] * vtype.count))
        ax = builder.bitcast(builder.and_(bits, ir.Constant(ints, [ir.Constant(ir.IntType(32), (1 << 31) - 1)] * vtype.count)), vtype)
        a = builder.fmul(c(-2.0), ax)
        a = builder.select(builder.fcmp_ordered("<", a, c(-87.0)), c(-87.0), a)  # e underflows below
        # exp(a) = 2^n exp(r), |r| <= ln2/2; adding and subtracting 1.5 * 2^23 rounds to an integer.
        n = builder.fsub(builder.call(fma, [a, c(1.44269504), c(12582912.0)]), c(12582912.0))
        r = builder.call(fma, [builder.fsub(c(0.0), n), c(0.693145752), a])
        r = builder.call(fma, [builder.fsub(c(0.0), n), c(1.42860677e-6), r])
        p = horner(r, [1 / 40320, 1 / 5040, 1 / 720, 1 / 120, 1 / 24, 1 / 6, 0.5, 1.0, 1.0])
        scale = builder.shl(builder.add(builder.fptosi(n, ints), ir.Constant(ints, [ir.Constant(ir.IntType(32), 127)] * vtype.count)),
                            ir.Constant(ints, [ir.Constant(ir.IntType(32), 23)] * vtype.count))
        e = builder.fmul(p, builder.bitcast(scale, vtype))
        big = builder.fdiv(builder.fsub(c(1.0), e), builder.fadd(c(1.0), e))
        big = builder.bitcast(builder.or_(builder.bitcast(big, ints), sign), vtype)
        x2 = builder.fmul(x, x)
        s = horner(x2, [-1382 / 155925, 62 / 2835, -17 / 315, 2 / 15, -1 / 3])
        small = builder.call(fma, [builder.fmul(x, x2), s, x])
        return builder.select(builder.fcmp_ordered("<", ax, c(0.25)), small, big)

    return v(v), codegen


def _clamp(builder, v, bound):
    hi, lo = _vconst(v.type, bound), _vconst(v.type, -bound)
    v = builder.select(builder.fcmp_ordered(">", v, hi), hi, v)
    return builder.select(builder.fcmp_ordered("<", v, lo), lo, v)


@intrinsic
def _vtimes_dtanh(typingctx, g, y):
    """g * (1 - y^2): the gradient through tanh, from its output y."""

    def codegen(context, builder, sig, args):
        g, y = args
        return builder.fmul(g, builder.fsub(_vconst(y.type, 1.0), builder.fmul(y, y)))

    return g(g, y), codegen


@intrinsic
def _vtimes_drelu(typingctx, g, y):
    """g where y > 0, else 0; a NaN output lets the gradient through, as torch's threshold_backward."""

    def codegen(context, builder, sig, args):
        g, y = args
        zero = _vconst(y.type, 0.0)
        return builder.select(builder.fcmp_ordered("<=", y, zero), zero, g)

    return g(g, y), codegen


@intrinsic
def _vzero(typingctx, ary):
    """A vector of zeros of ``ary``'s dtype."""
    vec = _Vec(ary.dtype)
    return vec(ary), lambda context, builder, sig, args: _vconst(context.get_value_type(vec), 0.0)


@intrinsic
def _vadd(typingctx, a, b):
    return a(a, b), lambda context, builder, sig, args: builder.fadd(*args)


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


# ---------------------------------------------------------------------------------------------
# One step for a run of rows, shared by the forward and the backward:
#
#     dst[d + r] = epilogue(init[d + r] + prev[p + r] @ m)        for r < n
#
# forward: init = dst = out (the input projection, replaced by the output), prev the previous
# step's rows, m = W_hh^T, epilogue the nonlinearity. backward: init = grad_out, dst = dz, prev
# the next step's dz, m = W_hh, epilogue the product with act'(y), y the saved output. All are
# flat 1-D views (row r of an [N, H] array starts at r * H). Rows go four at a time (the last
# block repeats its last row: each tile loads before it stores, so a repeated row writes the
# same values twice), columns a vector or two at a time, any last H % lanes columns by hand.
#
# The tiles are inlined into :func:`_step` by Numba itself (``inline="always"``): as calls, each
# passed its five arrays as some forty scalars through the stack, and LLVM did not inline them
# across Numba's function boundaries; that call cost more than a small tile's arithmetic (the
# article's shape ran 2.2x slower, forward and backward alike).


@njit(inline="always", **_KERNEL)
def _finish(dst, y, at, acc, relu, backward):
    if backward:
        yv = _vload(y, at)
        acc = _vtimes_drelu(acc, yv) if relu else _vtimes_dtanh(acc, yv)
    else:
        acc = _vrelu(acc) if relu else _vtanh(acc)
    _vstore(dst, at, acc)


@njit(inline="always", **_KERNEL)
def _finish_scalar(acc, y, at, relu, backward):
    """:func:`_finish` for one value: the epilogue of the forward (act) or the backward (times act')."""
    if backward:
        ya = y[at]
        if relu:
            return 0 if ya <= 0 else acc  # threshold_backward: a NaN output lets it through
        return acc * (1 - ya * ya)
    if relu:
        return 0 if acc < 0 else acc  # keeps NaN, as torch.relu does
    return _tanh(acc)


@njit(inline="always", **_KERNEL)
def _tile4x2(prev, p0, p1, p2, p3, m, hidden, j, init, dst, y, d0, d1, d2, d3, relu, backward):
    """Four rows by two vectors of columns from j: eight accumulators in registers."""
    jb = j + _lanes(m)
    a0, b0 = _vload(init, d0 + j), _vload(init, d0 + jb)
    a1, b1 = _vload(init, d1 + j), _vload(init, d1 + jb)
    a2, b2 = _vload(init, d2 + j), _vload(init, d2 + jb)
    a3, b3 = _vload(init, d3 + j), _vload(init, d3 + jb)
    for k in range(hidden):
        wa, wb = _vload(m, k * hidden + j), _vload(m, k * hidden + jb)
        s = _vbroadcast(prev, p0 + k)
        a0, b0 = _vfma(s, wa, a0), _vfma(s, wb, b0)
        s = _vbroadcast(prev, p1 + k)
        a1, b1 = _vfma(s, wa, a1), _vfma(s, wb, b1)
        s = _vbroadcast(prev, p2 + k)
        a2, b2 = _vfma(s, wa, a2), _vfma(s, wb, b2)
        s = _vbroadcast(prev, p3 + k)
        a3, b3 = _vfma(s, wa, a3), _vfma(s, wb, b3)
    _finish(dst, y, d0 + j, a0, relu, backward)
    _finish(dst, y, d0 + jb, b0, relu, backward)
    _finish(dst, y, d1 + j, a1, relu, backward)
    _finish(dst, y, d1 + jb, b1, relu, backward)
    _finish(dst, y, d2 + j, a2, relu, backward)
    _finish(dst, y, d2 + jb, b2, relu, backward)
    _finish(dst, y, d3 + j, a3, relu, backward)
    _finish(dst, y, d3 + jb, b3, relu, backward)


@njit(inline="always", **_KERNEL)
def _tile4x1(prev, p0, p1, p2, p3, m, hidden, j, init, dst, y, d0, d1, d2, d3, relu, backward):
    """Four rows by one vector of columns from j."""
    a0, a1, a2, a3 = _vload(init, d0 + j), _vload(init, d1 + j), _vload(init, d2 + j), _vload(init, d3 + j)
    for k in range(hidden):
        w = _vload(m, k * hidden + j)
        a0 = _vfma(_vbroadcast(prev, p0 + k), w, a0)
        a1 = _vfma(_vbroadcast(prev, p1 + k), w, a1)
        a2 = _vfma(_vbroadcast(prev, p2 + k), w, a2)
        a3 = _vfma(_vbroadcast(prev, p3 + k), w, a3)
    _finish(dst, y, d0 + j, a0, relu, backward)
    _finish(dst, y, d1 + j, a1, relu, backward)
    _finish(dst, y, d2 + j, a2, relu, backward)
    _finish(dst, y, d3 + j, a3, relu, backward)


@njit(inline="always", **_KERNEL)
def _tile1x4(prev, p, m, hidden, j, init, dst, y, d, relu, backward):
    """One row by four vectors of columns from j. A row alone has no other work to hide the
    FMAs' latency behind, so four k apart accumulate apart: sixteen chains, not four."""
    step = _lanes(m)
    j1, j2, j3 = j + step, j + 2 * step, j + 3 * step
    a0, a1, a2, a3 = _vload(init, d + j), _vload(init, d + j1), _vload(init, d + j2), _vload(init, d + j3)
    b0 = b1 = b2 = b3 = c0 = c1 = c2 = c3 = e0 = e1 = e2 = e3 = _vzero(m)
    k = 0
    while k + 3 < hidden:
        at = k * hidden
        s = _vbroadcast(prev, p + k)
        a0, a1 = _vfma(s, _vload(m, at + j), a0), _vfma(s, _vload(m, at + j1), a1)
        a2, a3 = _vfma(s, _vload(m, at + j2), a2), _vfma(s, _vload(m, at + j3), a3)
        at += hidden
        s = _vbroadcast(prev, p + k + 1)
        b0, b1 = _vfma(s, _vload(m, at + j), b0), _vfma(s, _vload(m, at + j1), b1)
        b2, b3 = _vfma(s, _vload(m, at + j2), b2), _vfma(s, _vload(m, at + j3), b3)
        at += hidden
        s = _vbroadcast(prev, p + k + 2)
        c0, c1 = _vfma(s, _vload(m, at + j), c0), _vfma(s, _vload(m, at + j1), c1)
        c2, c3 = _vfma(s, _vload(m, at + j2), c2), _vfma(s, _vload(m, at + j3), c3)
        at += hidden
        s = _vbroadcast(prev, p + k + 3)
        e0, e1 = _vfma(s, _vload(m, at + j), e0), _vfma(s, _vload(m, at + j1), e1)
        e2, e3 = _vfma(s, _vload(m, at + j2), e2), _vfma(s, _vload(m, at + j3), e3)
        k += 4
    while k < hidden:
        s, at = _vbroadcast(prev, p + k), k * hidden
        a0, a1 = _vfma(s, _vload(m, at + j), a0), _vfma(s, _vload(m, at + j1), a1)
        a2, a3 = _vfma(s, _vload(m, at + j2), a2), _vfma(s, _vload(m, at + j3), a3)
        k += 1
    _finish(dst, y, d + j, _vadd(_vadd(a0, b0), _vadd(c0, e0)), relu, backward)
    _finish(dst, y, d + j1, _vadd(_vadd(a1, b1), _vadd(c1, e1)), relu, backward)
    _finish(dst, y, d + j2, _vadd(_vadd(a2, b2), _vadd(c2, e2)), relu, backward)
    _finish(dst, y, d + j3, _vadd(_vadd(a3, b3), _vadd(c3, e3)), relu, backward)


@njit(inline="always", **_KERNEL)
def _tile1x1(prev, p, m, hidden, j, init, dst, y, d, relu, backward):
    """One row by one vector of columns from j."""
    a = _vload(init, d + j)
    for k in range(hidden):
        a = _vfma(_vbroadcast(prev, p + k), _vload(m, k * hidden + j), a)
    _finish(dst, y, d + j, a, relu, backward)


@njit(**_KERNEL)
def _columns_by_hand(prev, p, m, hidden, j0, init, dst, y, d, relu, backward):
    """Columns j0.. of one row without vectors: the last H % lanes, or all of a small H."""
    for j in range(j0, hidden):
        acc = init[d + j]
        for k in range(hidden):
            acc += prev[p + k] * m[k * hidden + j]
        dst[d + j] = _finish_scalar(acc, y, d + j, relu, backward)


@njit(**_KERNEL)
def _step(prev, prow, m, hidden, init, dst, y, drow, n, relu, backward):
    """Rows drow..drow+n of dst from rows prow..prow+n of prev (see the section's comment)."""
    step = _lanes(m)
    vectors = hidden - hidden % step  # columns the tiles take
    if n >= 4:
        for r in range(0, n, 4):
            last = n - 1
            p0, d0 = (prow + r) * hidden, (drow + r) * hidden
            p1, d1 = (prow + min(r + 1, last)) * hidden, (drow + min(r + 1, last)) * hidden
            p2, d2 = (prow + min(r + 2, last)) * hidden, (drow + min(r + 2, last)) * hidden
            p3, d3 = (prow + min(r + 3, last)) * hidden, (drow + min(r + 3, last)) * hidden
            j = 0
            while j + 2 * step <= vectors:
                _tile4x2(prev, p0, p1, p2, p3, m, hidden, j, init, dst, y, d0, d1, d2, d3, relu, backward)
                j += 2 * step
            if j < vectors:
                _tile4x1(prev, p0, p1, p2, p3, m, hidden, j, init, dst, y, d0, d1, d2, d3, relu, backward)
            if vectors < hidden:
                for i in range(r, min(r + 4, n)):  # each row once: these columns load and store per row
                    _columns_by_hand(prev, (prow + i) * hidden, m, hidden, vectors, init, dst, y, (drow + i) * hidden,
                                     relu, backward)
    else:
        for i in range(n):
            p, d = (prow + i) * hidden, (drow + i) * hidden
            j = 0
            while j + 4 * step <= vectors:
                _tile1x4(prev, p, m, hidden, j, init, dst, y, d, relu, backward)
                j += 4 * step
            while j < vectors:
                _tile1x1(prev, p, m, hidden, j, init, dst, y, d, relu, backward)
                j += step
            _columns_by_hand(prev, p, m, hidden, vectors, init, dst, y, d, relu, backward)


@njit(**_KERNEL)
def forward_rows(out, h0, wt, batch_sizes, offsets, relu, lo, hi, h_n):
    """Rows lo..hi of the whole sequence. ``out`` holds the input projection (bias included) and
    becomes the output: out[t, b] = act(out[t, b] + h_{t-1}[b] @ W_hh^T), ``wt`` being W_hh^T."""
    hidden = out.shape[1]
    flat, start, m = out.reshape(out.size), h0.reshape(h0.size), wt.reshape(wt.size)
    for t in range(batch_sizes.shape[0]):
        end = min(hi, batch_sizes[t])
        if end <= lo:
            break
        if t == 0:
            _step(start, lo, m, hidden, flat, flat, flat, offsets[0] + lo, end - lo, relu, False)
        else:
            _step(flat, offsets[t - 1] + lo, m, hidden, flat, flat, flat, offsets[t] + lo, end - lo, relu, False)
    _final_states(out, h0, batch_sizes, offsets, lo, hi, h_n)


@njit(parallel=True, **_KERNEL)
def forward_parallel(out, h0, w, batch_sizes, offsets, relu, h_n, chunks, gemm, scratch):
    """Chunks of batch rows in parallel, each through the whole sequence: a row's steps depend on
    its own previous state only, so the threads never wait for each other. ``w`` is W_hh^T.
    ``gemm``: each chunk runs :func:`forward_gemm`, whose per-step BLAS call then stays on its
    own thread while every core works; otherwise :func:`forward_rows`."""
    batch = h0.shape[0]
    for c in prange(chunks):
        lo, hi = c * batch // chunks, (c + 1) * batch // chunks
        if gemm:
            forward_gemm(out, h0, w, batch_sizes, offsets, relu, lo, hi, h_n, scratch)
        else:
            forward_rows(out, h0, w, batch_sizes, offsets, relu, lo, hi, h_n)


@njit(inline="always", **_KERNEL)
def _epilogue(acc, a0, init, i0, dst, y, count, relu, backward):
    """After a step's GEMM, count flat elements from a0 of acc and i0 of the rest:
    dst = epilogue(init + acc) as in :func:`_step`, in vectors, the last count % lanes by hand."""
    step = _lanes(acc)
    vectors = count - count % step
    for i in range(0, vectors, step):
        _finish(dst, y, i0 + i, _vadd(_vload(init, i0 + i), _vload(acc, a0 + i)), relu, backward)
    for i in range(vectors, count):
        dst[i0 + i] = _finish_scalar(init[i0 + i] + acc[a0 + i], y, i0 + i, relu, backward)


@njit(**_KERNEL)
def forward_gemm(out, h0, wt, batch_sizes, offsets, relu, lo, hi, h_n, scratch):
    """The same recurrence for rows lo..hi with each step's h_{t-1} @ W_hh^T as one BLAS GEMM
    into the same rows of ``scratch``."""
    hidden = out.shape[1]
    flat, acc = out.reshape(out.size), scratch.reshape(scratch.size)
    for t in range(batch_sizes.shape[0]):
        end = min(hi, batch_sizes[t])
        if end <= lo:
            break
        prev = h0[lo:end] if t == 0 else out[offsets[t - 1] + lo : offsets[t - 1] + end]
        np.dot(prev, wt, scratch[lo:end])
        _epilogue(acc, lo * hidden, flat, (offsets[t] + lo) * hidden, flat, flat, (end - lo) * hidden, relu, False)
    _final_states(out, h0, batch_sizes, offsets, lo, hi, h_n)


@njit(parallel=True, **_KERNEL)
def forward_columns(out, h0, blocks, batch_sizes, offsets, relu, h_n, scratch):
    """The recurrence with each step's product split by output columns, one block a thread:
    ``blocks[c]`` holds columns c*w..c*w+w of W_hh^T (w = blocks.shape[2], the last block padded
    with zeros), so a thread reads only its share of W_hh, which can stay in its core's cache
    from step to step, where row chunks each stream all of it. The price is a join of the
    threads every step (each block needs every column of the previous step). ``scratch``
    [chunks, B, w]: each block's product."""
    hidden, width = out.shape[1], blocks.shape[2]
    flat, acc = out.reshape(out.size), scratch.reshape(scratch.size)
    for t in range(batch_sizes.shape[0]):
        rows, base = batch_sizes[t], offsets[t]
        for c in prange(blocks.shape[0]):
            prev = h0[:rows] if t == 0 else out[offsets[t - 1] : offsets[t - 1] + rows]
            np.dot(prev, blocks[c], scratch[c, :rows])
            j0 = c * width
            count = min(hidden, j0 + width) - j0
            for b in range(rows):
                at = (base + b) * hidden + j0
                _epilogue(acc, (c * scratch.shape[1] + b) * width, flat, at, flat, flat, count, relu, False)
    _final_states(out, h0, batch_sizes, offsets, 0, h0.shape[0], h_n)


@njit(parallel=True, **_KERNEL)
def backward_columns(dz, grad_out, grad_h_n, out, blocks, batch_sizes, offsets, relu, scratch):
    """:func:`backward_gemm` split by columns as :func:`forward_columns`: ``blocks[c]`` holds
    columns of W_hh (not transposed), each step's dz_{t+1} @ W_hh a block a thread."""
    hidden, width = dz.shape[1], blocks.shape[2]
    seq_len = batch_sizes.shape[0]
    dzf, gof, outf, acc = dz.reshape(dz.size), grad_out.reshape(grad_out.size), out.reshape(out.size), scratch.reshape(scratch.size)
    for t in range(seq_len - 1, -1, -1):
        end, base = batch_sizes[t], offsets[t]
        following = min(end, batch_sizes[t + 1]) if t + 1 < seq_len else 0
        for c in prange(blocks.shape[0]):
            j0 = c * width
            j1 = min(hidden, j0 + width)
            if following > 0:
                np.dot(dz[offsets[t + 1] : offsets[t + 1] + following], blocks[c], scratch[c, :following])
                for b in range(following):
                    _epilogue(acc, (c * scratch.shape[1] + b) * width, gof, (base + b) * hidden + j0, dzf, outf,
                              j1 - j0, relu, True)
            _ended_rows(dz, grad_out, grad_h_n, out, base, following, end, j0, j1, relu)


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


@njit(**_KERNEL)
def activate(flat, relu):
    """The nonlinearity in place over a contiguous 1-D array, in vectors: the epilogue of a cell
    step done as torch GEMMs (torch's tanh_ on two threads took twice this at B, H = 64, 128)."""
    step = _lanes(flat)
    vectors = flat.size - flat.size % step
    for i in range(0, vectors, step):
        _finish(flat, flat, i, _vload(flat, i), relu, False)
    for i in range(vectors, flat.size):
        flat[i] = _finish_scalar(flat[i], flat, i, relu, False)


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


@njit(inline="always", **_KERNEL)
def _ended_rows(dz, grad_out, grad_h_n, out, base, b0, b1, j0, j1, relu):
    """Columns j0..j1 of rows b0..b1 of the step at ``base``, rows whose sequence ends there:
    dz = (grad_out + grad_h_n) * act'(z), with nothing from a following step."""
    for b in range(b0, b1):
        g = dz[base + b, j0:j1]
        go = grad_out[base + b, j0:j1]
        hn = grad_h_n[b, j0:j1]
        for j in range(j1 - j0):
            g[j] = go[j] + hn[j]
        _times_dact(g, out[base + b, j0:j1], relu)


@njit(**_KERNEL)
def backward_rows(dz, grad_out, grad_h_n, out, w, batch_sizes, offsets, relu, lo, hi):
    """Reverse recurrence for rows lo..hi: dz_t = (grad_out_t + dz_{t+1} @ W_hh) * act'(z_t),
    with grad_h_n in place of dz_{t+1} @ W_hh for a row whose sequence ends at step t."""
    hidden = dz.shape[1]
    seq_len = batch_sizes.shape[0]
    dzf, gof, outf, m = dz.reshape(dz.size), grad_out.reshape(grad_out.size), out.reshape(out.size), w.reshape(w.size)
    for t in range(seq_len - 1, -1, -1):
        end = min(hi, batch_sizes[t])
        if end <= lo:
            continue
        following = max(lo, min(end, batch_sizes[t + 1])) if t + 1 < seq_len else lo
        base = offsets[t]
        if following > lo:
            _step(dzf, offsets[t + 1] + lo, m, hidden, gof, dzf, outf, base + lo, following - lo, relu, True)
        _ended_rows(dz, grad_out, grad_h_n, out, base, following, end, 0, hidden, relu)


@njit(**_KERNEL)
def backward_gemm(dz, grad_out, grad_h_n, out, w, batch_sizes, offsets, relu, lo, hi, scratch):
    """The reverse recurrence for rows lo..hi with each step's dz_{t+1} @ W_hh as one BLAS GEMM
    into the same rows of ``scratch``."""
    hidden = dz.shape[1]
    seq_len = batch_sizes.shape[0]
    dzf, gof, outf, acc = dz.reshape(dz.size), grad_out.reshape(grad_out.size), out.reshape(out.size), scratch.reshape(scratch.size)
    for t in range(seq_len - 1, -1, -1):
        end = min(hi, batch_sizes[t])
        if end <= lo:
            continue
        following = max(lo, min(end, batch_sizes[t + 1])) if t + 1 < seq_len else lo
        base = offsets[t]
        if following > lo:
            np.dot(dz[offsets[t + 1] + lo : offsets[t + 1] + following], w, scratch[lo:following])
            _epilogue(acc, lo * hidden, gof, (base + lo) * hidden, dzf, outf, (following - lo) * hidden, relu, True)
        _ended_rows(dz, grad_out, grad_h_n, out, base, following, end, 0, hidden, relu)


@njit(parallel=True, **_KERNEL)
def backward_parallel(dz, grad_out, grad_h_n, out, w, batch_sizes, offsets, relu, chunks, gemm, scratch):
    """Chunks of batch rows in parallel, as :func:`forward_parallel`; ``w`` is W_hh, for the
    BLAS steps and the hand loops alike."""
    batch = grad_h_n.shape[0]
    for c in prange(chunks):
        lo, hi = c * batch // chunks, (c + 1) * batch // chunks
        if gemm:
            backward_gemm(dz, grad_out, grad_h_n, out, w, batch_sizes, offsets, relu, lo, hi, scratch)
        else:
            backward_rows(dz, grad_out, grad_h_n, out, w, batch_sizes, offsets, relu, lo, hi)


# ---------------------------------------------------------------------------------------------
# A whole dense layer in one call, for small shapes: the kernels above wait on torch for the
# input projection before them and the gradient GEMMs after them, and at a few thousand
# multiply-adds each of those calls (and each NumPy view of a tensor) costs more than its
# arithmetic. Here the projection and the gradients are hand loops inside the kernel, beside the
# same recurrence steps. The operands come as the addresses of contiguous CPU tensors (as for
# :func:`cell`), dense [T, B, .] rows, checked by the caller; outputs are NumPy arrays.


@njit(inline="always", **_KERNEL)
def _layer_operands(x_at, w_ih_at, w_hh_at, b_ih_at, b_hh_at, bias, features, like):
    """x [T B, I] as an array (``like`` the output [T B, H]); W_ih^T [I, H] and W_hh^T [H, H]
    copied, so that the loops over a row's units run along contiguous memory; b = b_ih + b_hh
    (zeros without bias)."""
    rows, hidden = like.shape[0], like.shape[1]
    dtype = like.dtype
    x = numba.carray(_address(x_at), (rows, features), dtype)
    w_ih = numba.carray(_address(w_ih_at), (hidden, features), dtype)
    w_hh = numba.carray(_address(w_hh_at), (hidden, hidden), dtype)
    wit, wt = np.ascontiguousarray(w_ih.T), np.ascontiguousarray(w_hh.T)
    if bias:
        b = numba.carray(_address(b_ih_at), (hidden,), dtype) + numba.carray(_address(b_hh_at), (hidden,), dtype)
    else:
        b = np.zeros(hidden, dtype)
    return x, wit, wt, b


@njit(inline="always", **_KERNEL)
def _add_row_times(dst, a, w):
    """dst += a @ w for one row a: w's rows scaled by a's elements, so that the inner loop runs
    along w's contiguous rows."""
    for k in range(w.shape[0]):
        s = a[k]
        wk = w[k]
        for j in range(w.shape[1]):
            dst[j] += s * wk[j]


@njit(inline="always", **_KERNEL)
def _project_row(dst, d, x, i, wit, b, features):
    """dst[d : d + H] = b + x[i : i + features] @ W_ih^T, in vectors (``wit`` W_ih^T [I, H] flat,
    H = b's length), the last H % lanes columns by hand. As array slices (a view and a loop per
    row) the article shape's projection cost a fifth of its forward."""
    hidden = b.shape[0]
    step = _lanes(b)
    vectors = hidden - hidden % step
    for j in range(0, vectors, step):
        acc = _vload(b, j)
        for k in range(features):
            acc = _vfma(_vbroadcast(x, i + k), _vload(wit, k * hidden + j), acc)
        _vstore(dst, d + j, acc)
    for j in range(vectors, hidden):
        acc = b[j]
        for k in range(features):
            acc += x[i + k] * wit[k * hidden + j]
        dst[d + j] = acc


@njit(inline="always", **_KERNEL)
def _add_outer(dst, u, v):
    """dst += the outer product of u and v (dst[k] += u[k] v), along dst's contiguous rows."""
    for k in range(u.shape[0]):
        s = u[k]
        row = dst[k]
        for j in range(v.shape[0]):
            row[j] += s * v[j]


@njit(inline="always", **_KERNEL)
def _layer_rows(x, h0, wit, wt, b, out, h_n, batch, relu, lo, hi):
    """Rows lo..hi of every step: each step's input projection by hand into ``out``, then the
    step itself as in :func:`forward_rows` (``out`` [T B, H] flat rows, h0 and h_n [B, H])."""
    hidden = out.shape[1]
    seq_len = out.shape[0] // batch if batch > 0 else 0
    flat, start, m = out.reshape(out.size), h0.reshape(h0.size), wt.reshape(wt.size)
    xf, wf = x.reshape(x.size), wit.reshape(wit.size)
    for t in range(seq_len):
        for r in range(t * batch + lo, t * batch + hi):
            _project_row(flat, r * hidden, xf, r * x.shape[1], wf, b, x.shape[1])
        if t == 0:
            _step(start, lo, m, hidden, flat, flat, flat, lo, hi - lo, relu, False)
        else:
            _step(flat, (t - 1) * batch + lo, m, hidden, flat, flat, flat, t * batch + lo, hi - lo, relu, False)
    last = (seq_len - 1) * batch
    for r in range(lo, hi):
        h_n[r] = out[last + r]


@njit(**_KERNEL)
def layer_forward(x_at, h0_at, w_ih_at, w_hh_at, b_ih_at, b_hh_at, bias, features, relu, out, h_n):
    """The forward of one dense layer, input projection included, on the calling thread:
    ``out`` [T B, H] and ``h_n`` [B, H] are written; the other operands are addresses (x
    [T B, I], h0 [B, H], W_ih [H, I], W_hh [H, H], the biases [H] when ``bias``)."""
    batch, hidden = h_n.shape
    x, wit, wt, b = _layer_operands(x_at, w_ih_at, w_hh_at, b_ih_at, b_hh_at, bias, features, out)
    h0 = numba.carray(_address(h0_at), (batch, hidden), out.dtype)
    _layer_rows(x, h0, wit, wt, b, out, h_n, batch, relu, 0, batch)


@njit(parallel=True, **_KERNEL)
def layer_forward_parallel(x_at, h0_at, w_ih_at, w_hh_at, b_ih_at, b_hh_at, bias, features, relu, out, h_n, chunks):
    """:func:`layer_forward` in chunks of batch rows in parallel, as :func:`forward_parallel`."""
    batch, hidden = h_n.shape
    x, wit, wt, b = _layer_operands(x_at, w_ih_at, w_hh_at, b_ih_at, b_hh_at, bias, features, out)
    h0 = numba.carray(_address(h0_at), (batch, hidden), out.dtype)
    for c in prange(chunks):
        _layer_rows(x, h0, wit, wt, b, out, h_n, batch, relu, c * batch // chunks, (c + 1) * batch // chunks)


@njit(**_KERNEL)
def layer_backward(grad_out_at, grad_h_n_at, x_at, h0_at, w_ih_at, w_hh_at, out_at, seq_len, features, relu,
                   need_x, dx, dh0, dw_ih, dw_hh, db):
    """The backward of :func:`layer_forward`, every gradient in this one call: the reverse
    recurrence as in :func:`backward_rows` into a dz of its own, then by hand loops over dz
    dx = dz W_ih (when ``need_x``), dh0 = dz_0 W_hh, dW_ih = dz^T x, dW_hh = dz^T h_{t-1} and
    db = the column sums of dz. ``grad_out`` [T B, H], ``grad_h_n`` [B, H] and ``out`` come as
    addresses with the forward's operands; dx [T B, I] (read only when ``need_x``), dh0 [B, H],
    dw_ih [H, I], dw_hh [H, H] and db [H] are written."""
    batch, hidden = dh0.shape
    dtype = dh0.dtype
    rows = seq_len * batch
    grad_out = numba.carray(_address(grad_out_at), (rows, hidden), dtype)
    grad_h_n = numba.carray(_address(grad_h_n_at), (batch, hidden), dtype)
    out = numba.carray(_address(out_at), (rows, hidden), dtype)
    x = numba.carray(_address(x_at), (rows, features), dtype)
    h0 = numba.carray(_address(h0_at), (batch, hidden), dtype)
    w_ih = numba.carray(_address(w_ih_at), (hidden, features), dtype)
    w_hh = numba.carray(_address(w_hh_at), (hidden, hidden), dtype)

    # dz, from the last step back; the last step's rows take grad_h_n in place of dz_{t+1} W_hh.
    dz = np.empty((rows, hidden), dtype)
    last = rows - batch
    for b in range(batch):
        g, go, hn = dz[last + b], grad_out[last + b], grad_h_n[b]
        for j in range(hidden):
            g[j] = go[j] + hn[j]
        _times_dact(g, out[last + b], relu)
    dzf, gof, outf, m = dz.reshape(dz.size), grad_out.reshape(grad_out.size), out.reshape(out.size), w_hh.reshape(w_hh.size)
    for t in range(seq_len - 2, -1, -1):
        _step(dzf, (t + 1) * batch, m, hidden, gof, dzf, outf, t * batch, batch, relu, True)

    # The sums over rows, each row's dz scaled into the rows of the weight gradients.
    db[:] = 0
    dw_hh[:] = 0
    dwit = np.zeros((features, hidden), dtype)  # dW_ih^T: its rows run along the units, as dz's
    for r in range(rows):
        g = dz[r]
        db += g
        _add_outer(dwit, x[r], g)
        _add_outer(dw_hh, g, h0[r] if r < batch else out[r - batch])
    dw_ih[:, :] = dwit.T

    # dh0 = dz_0 W_hh and dx = dz W_ih, row by row.
    dh0[:] = 0
    for b in range(batch):
        _add_row_times(dh0[b], dz[b], w_hh)
    if need_x:
        dx[:] = 0
        for r in range(rows):
            _add_row_times(dx[r], dz[r], w_ih)
