"""Resident memory stays flat over many forward + backward calls, every backend.

Resident set size comes from /proc/self/statm. Each call allocates outputs, saved tensors and
gradients of over 1 MB (one layer's output alone is 0.33 MB), so leaking any of them per call
grows memory by 65 MB or more over the default run, past the bound; allocator noise and
caches stay well under it. The default run does 200 calls per fast backend (20 on the reference
loop, at a smaller shape); ``pytest -m slow`` does 5,000 (300). Run with ``-s`` to see the
measured growth.
"""

import ctypes
import ctypes.util
import gc
import os

import pytest
import torch
from torch.nn.utils.rnn import pack_sequence

import myrnn_fast

BOUND_MB = 50
_PAGE = os.sysconf("SC_PAGE_SIZE")

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux /proc")


def _libc_malloc_trim():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim
    except (OSError, AttributeError, TypeError):  # not glibc
        return None


_malloc_trim = _libc_malloc_trim()


def resident_mb() -> float:
    """Resident memory now. Freed heap memory is first handed back to the system (glibc's
    malloc_trim): otherwise a long test session leaves hundreds of MB free but resident, and a
    leak would fill that before the figure moved."""
    gc.collect()
    if _malloc_trim is not None:
        _malloc_trim(0)
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE / 2**20


def _workload(backend):
    """One call: forward + backward of a 2-layer bidirectional RNN (dense, then packed on odd
    calls) and a short RNNCell unroll, gradients of everything."""
    torch.manual_seed(0)
    small = backend == "reference"  # the oracle is ~100x slower: a smaller shape
    T, B, H = (4, 2, 8) if small else (20, 32, 32)
    rnn = myrnn_fast.RNN(4, H, 2, bidirectional=True, dtype=torch.float64, backend=backend)
    cell = myrnn_fast.RNNCell(4, H, dtype=torch.float64, backend=backend)
    x = torch.randn(T, B, 4, dtype=torch.float64, requires_grad=True)
    hx = torch.randn(4, B, H, dtype=torch.float64, requires_grad=True)
    seqs = [x[: T - i % (T // 2), i] for i in range(B)]
    params = [*rnn.parameters(), *cell.parameters()]
    calls = [0]

    def call():
        calls[0] += 1
        inp = pack_sequence(seqs, enforce_sorted=False) if calls[0] % 2 else x
        out, h_n = rnn(inp, hx)
        out = out.data if isinstance(out, torch.nn.utils.rnn.PackedSequence) else out
        h = hx[0]
        for t in range(3):
            h = cell(x[t], h)
        loss = (out**2).sum() + h_n.sum() + h.sum()
        return torch.autograd.grad(loss, [x, hx, *params])

    return call


@pytest.fixture
def one_thread():
    # Memory, not speed, is measured: one intra-op thread keeps the run quick on a busy machine.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _growth(backend, calls):
    call = _workload(backend)
    for _ in range(max(20, calls // 10)):  # warm-up: JIT compilation, allocator pools, caches
        call()
    before = resident_mb()
    for _ in range(calls):
        call()
    growth = resident_mb() - before
    print(f"\n{backend}: {calls} forward+backward calls, resident memory {before:.1f} MB -> {before + growth:.1f} MB ({growth:+.2f} MB)")
    return growth


def test_resident_memory_is_flat(backend, one_thread):
    growth = _growth(backend, 20 if backend == "reference" else 200)
    assert growth < BOUND_MB


@pytest.mark.slow
def test_resident_memory_is_flat_long(backend, one_thread):
    growth = _growth(backend, 300 if backend == "reference" else 5_000)
    assert growth < BOUND_MB


def test_the_probe_sees_a_leak():
    # The measurement itself works: holding on to 2 * BOUND_MB of tensors shows up.
    before = resident_mb()
    held = [torch.ones(2**17, dtype=torch.float64) for _ in range(2 * BOUND_MB)]  # 1 MB each
    assert resident_mb() - before > 1.5 * BOUND_MB
    del held
