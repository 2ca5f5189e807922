"""One module shared by several Python threads, each running forward + backward on its own
inputs at the same time, gives what serial runs give. Gradients come from torch.autograd.grad,
so the threads do not race on ``.grad``."""

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from torch.nn.utils.rnn import PackedSequence, pack_sequence

import myrnn_fast

THREADS = 4


def _inputs(i, packed):
    g = torch.Generator().manual_seed(100 + i)
    hx = torch.randn(4, 3, 6, generator=g, dtype=torch.float64).requires_grad_()
    if packed:
        seqs = [torch.randn(n, 3, generator=g, dtype=torch.float64).requires_grad_() for n in (5 + i, 2, 4)]
        # Packing is part of each call's graph, so it happens per call.
        return lambda: pack_sequence(seqs, enforce_sorted=False), hx, [*seqs, hx]
    x = torch.randn(5 + i, 3, 3, generator=g, dtype=torch.float64).requires_grad_()
    return lambda: x, hx, [x, hx]


def _step(module, inputs):
    make_x, hx, leaves = inputs
    out, h_n = module(make_x(), hx)
    out = out.data if isinstance(out, PackedSequence) else out
    loss = (out**2).sum() + (h_n * torch.arange(h_n.numel(), dtype=h_n.dtype).view_as(h_n)).sum()
    return [out.detach(), h_n.detach(), *torch.autograd.grad(loss, [*leaves, *module.parameters()])]


def _concurrently(fn, n):
    barrier = threading.Barrier(n)

    def run(i):
        barrier.wait()  # start together, so the calls overlap
        return fn(i)

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(run, range(n)))


@pytest.mark.parametrize("packed", [False, True])
def test_shared_rnn_across_threads(backend, packed):
    torch.manual_seed(0)
    rnn = myrnn_fast.RNN(3, 6, 2, bidirectional=True, dtype=torch.float64, backend=backend)
    rounds = 2 if backend == "reference" else 10
    inputs = [_inputs(i, packed) for i in range(THREADS)]
    serial = [_step(rnn, inputs[i]) for i in range(THREADS)]

    threaded = _concurrently(lambda i: [_step(rnn, inputs[i]) for _ in range(rounds)], THREADS)

    for i, runs in enumerate(threaded):
        for r, results in enumerate(runs):
            for k, (a, b) in enumerate(zip(results, serial[i])):
                # Tight, not bitwise: a BLAS may split a product differently under contention.
                torch.testing.assert_close(
                    a, b, rtol=1e-13, atol=1e-13, msg=lambda m: f"thread {i} round {r} tensor {k}: {m}"
                )


def test_shared_cell_across_threads(backend):
    torch.manual_seed(0)
    cell = myrnn_fast.RNNCell(3, 6, dtype=torch.float64, backend=backend)
    xs = [torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(i)) for i in range(THREADS)]

    def unroll(i):
        h = torch.zeros(4, 6, dtype=torch.float64, requires_grad=True)
        state = h
        for _ in range(20):
            state = cell(xs[i], state)
        return [state.detach(), *torch.autograd.grad(state.sum(), [h, *cell.parameters()])]

    serial = [unroll(i) for i in range(THREADS)]
    threaded = _concurrently(lambda i: [unroll(i) for _ in range(5)], THREADS)
    for i, runs in enumerate(threaded):
        for results in runs:
            for a, b in zip(results, serial[i]):
                torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13)
