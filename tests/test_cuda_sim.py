"""The persistent CUDA kernels' bodies, run on the CPU by tests/cuda_sim/sim.cpp (one thread per CUDA
thread, a barrier for __syncthreads, shared memory poisoned with NaN), against a plain torch loop:
every rows-per-block variant, dense and packed, tanh and relu, float32 and float64, with hidden
sizes below, at and past the 4-wide vector loads and the 32-thread warp. This needs no GPU and no
CUDA toolkit, only the host C++ compiler; the kernels themselves are tested on a GPU in test_cuda.py."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

SOURCE = Path(__file__).parent / "cuda_sim" / "sim.cpp"
CSRC = Path(__file__).parent.parent / "csrc"  # the kernels include each other as "kernels/..."
COMPILER = shutil.which("c++") or shutil.which("g++")
pytestmark = pytest.mark.skipif(COMPILER is None, reason="no host C++ compiler to build the simulation")


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    library = tmp_path_factory.mktemp("cuda_sim") / "sim.so"
    command = [COMPILER, "-std=c++20", "-O1", "-pthread", "-shared", "-fPIC", "-I", str(CSRC), str(SOURCE),
               "-o", str(library)]
    subprocess.run(command, check=True, capture_output=True, text=True)
    lib = ctypes.CDLL(str(library))
    for fn in (lib.sim_forward, lib.sim_backward):
        fn.restype = ctypes.c_int
    return lib


def _ptr(t: torch.Tensor | None):
    return ctypes.c_void_p(t.data_ptr() if t is not None else None)


def _layout(T, B, packed):
    """Batch sizes (non-increasing, as in a PackedSequence) and offsets, as lists and as the kernels'
    Sequence arrays (None for dense input)."""
    sizes = [B] * T if not packed else [max(1, B - 2 * t) for t in range(T)]
    offsets = [sum(sizes[:t]) for t in range(T)]
    arrays = [torch.tensor(a, dtype=torch.int64) if packed else None for a in (sizes, offsets)]
    return sizes, offsets, arrays


def _reference(pre, h0, w_hh, sizes, offsets, relu, grad_out=None, grad_h_n=None):
    """out and h_n of h_t = act(pre_t + h_{t-1} W_hh^T) by rows, and d(loss)/d(pre) = dz."""
    pre = pre.detach().clone().requires_grad_()
    act = torch.relu if relu else torch.tanh
    h, outs, last = h0, [], [None] * h0.shape[0]
    for t, (n, o) in enumerate(zip(sizes, offsets)):
        h = act(pre[o:o + n] + h[:n] @ w_hh.T)
        outs.append(h)
        following = sizes[t + 1] if t + 1 < len(sizes) else 0
        for row in range(following, n):
            last[row] = h[row]
    out, h_n = torch.cat(outs), torch.stack(last)
    loss = 0
    if grad_out is not None:
        loss = loss + (out * grad_out).sum()
    if grad_h_n is not None:
        loss = loss + (h_n * grad_h_n).sum()
    dz = torch.autograd.grad(loss, pre)[0] if grad_out is not None or grad_h_n is not None else torch.zeros_like(pre)
    return out.detach(), h_n.detach(), dz


def _assert_close(actual, expected, what=""):
    """Against a float64 reference: float32 within what its rounding allows at the values' scale
    (relu sequences grow, and sums of 33 products cancel)."""
    if actual.dtype == torch.float64:
        tol = dict(rtol=1e-12, atol=1e-12)
    else:
        tol = dict(rtol=1e-4, atol=1e-5 * max(1.0, expected.abs().max().item()))
    torch.testing.assert_close(actual.double(), expected, **tol, msg=lambda m: f"{what}{m}")


# (H, register width): W_hh in shared memory (0) at sizes below, at and past the 4-wide loads and
# the 32-thread warp, and in registers at the smallest width that holds H and at a wider one.
VARIANTS = [(1, 0), (5, 0), (33, 0), (5, 32), (32, 32), (33, 64), (64, 64), (33, 128), (100, 128)]


# float64 columns stop at 64 registers.
CASES = [(d, h, r) for d in (torch.float32, torch.float64) for h, r in VARIANTS if not (d == torch.float64 and r == 128)]


@pytest.mark.parametrize("rows", [1, 2, 4, 8])
@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
@pytest.mark.parametrize("dtype,H,registers", CASES,
                         ids=[f"{str(d)[6:]}-H{h}-{'regs' + str(r) if r else 'shared'}" for d, h, r in CASES])
def test_persistent_kernels_match_a_plain_loop(sim, dtype, rows, packed, nonlinearity, H, registers):
    T, B = 6, 5  # 5 rows: a partial last block for 2, 4 and 8 rows per block
    relu = nonlinearity == "relu"
    sizes, offsets, (batch_sizes, offsets_array) = _layout(T, B, packed)
    N = sum(sizes)
    g = torch.Generator().manual_seed(H * 100 + rows)
    randn = lambda *s: (0.6 * torch.randn(*s, generator=g, dtype=torch.float64)).to(dtype)  # noqa: E731
    # W_hh at torch's init scale (1/sqrt(H)): larger, float32 rounding grows chaotically over steps.
    pre, h0, w_hh = randn(N, H), randn(B, H), (randn(H, H).double() / H**0.5).to(dtype)
    grad_out, grad_h_n = randn(N, H), randn(B, H)
    wide = [t.double() for t in (pre, h0, w_hh)]
    out_ref, h_n_ref, _ = _reference(*wide, sizes, offsets, relu, grad_out.double(), grad_h_n.double())

    out, h_n = pre.clone(), torch.full((B, H), float("nan"), dtype=dtype)
    w_t = w_hh.T.contiguous()
    size = dtype.itemsize
    sequence = (T, B, H, _ptr(batch_sizes), _ptr(offsets_array))
    assert sim.sim_forward(size, rows, registers, *sequence, _ptr(out), _ptr(h0), _ptr(w_t), _ptr(h_n), relu) == 0
    _assert_close(out, out_ref, "out: ")
    _assert_close(h_n, h_n_ref, "h_n: ")

    # The backward with each incoming gradient present or absent (null counts as zeros).
    for go, ghn in [(grad_out, grad_h_n), (grad_out, None), (None, grad_h_n), (None, None)]:
        wide_grads = [None if t is None else t.double() for t in (go, ghn)]
        dz_expected = _reference(*wide, sizes, offsets, relu, *wide_grads)[2]
        dz = torch.full((N, H), float("nan"), dtype=dtype)
        y = out_ref.to(dtype)
        assert sim.sim_backward(size, rows, registers, *sequence, _ptr(dz), _ptr(go), _ptr(ghn), _ptr(y),
                                _ptr(w_hh.contiguous()), relu) == 0
        _assert_close(dz, dz_expected, f"dz with grad_out={go is not None}, grad_h_n={ghn is not None}: ")


@pytest.mark.parametrize("size,rows,registers,H", [(4, 3, 0, 1), (4, 1, 16, 1), (8, 1, 128, 1), (4, 1, 32, 33)])
def test_variants_that_do_not_exist_are_refused(sim, size, rows, registers, H):
    x = torch.zeros(1, H)
    assert sim.sim_forward(size, rows, registers, 1, 1, H, None, None, _ptr(x), _ptr(x), _ptr(x), _ptr(x), 0) == 1
