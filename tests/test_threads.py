"""One module shared by several Python threads, each running forward + backward on its own
inputs at the same time, gives what serial runs give. Gradients come from torch.autograd.grad,
so the threads do not race on ``.grad``. The cpp backend's knobs may change meanwhile."""

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from torch.nn.utils.rnn import PackedSequence, pack_sequence

import myrnn_fast
from myrnn_fast import registry

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


@pytest.mark.skipif(
    registry.unavailable_reason("cpp") is not None, reason=f"cpp: {registry.unavailable_reason('cpp')}"
)
def test_knobs_flipped_while_forward_calls_run():
    """The cpp backend's knobs are read by kernels running with the GIL released: flipping the CPU
    path and instruction set from one thread while others run forwards must neither crash nor give
    anything but what some configuration gives serially (paths sum in different orders)."""
    from myrnn_fast import _C

    torch.manual_seed(0)
    rnn = myrnn_fast.RNN(3, 40, 2, dtype=torch.float64, backend="cpp")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(30, 8, 3, generator=g, dtype=torch.float64)
    args = (x[:, :4], torch.randn(4, 40, generator=g, dtype=torch.float64),
            *[p.detach() for p in (rnn.weight_ih_l0, rnn.weight_hh_l0, rnn.bias_ih_l0, rnn.bias_hh_l0)],
            None, "tanh")

    def run():
        with torch.no_grad():
            return [*torch.ops.myrnn_fast.rnn_forward(*args), *rnn(x)]

    settings = [dict(cpu_path=p, cpu_isa=i) for p in ("tiles", "gemm") for i in _C.cpu_isas()]
    before = _C.knobs()
    expected = run()
    stop = threading.Event()

    def flip():
        while not stop.is_set():
            for setting in settings:
                for name, value in setting.items():
                    _C.set_knob(name, value)

    flipper = threading.Thread(target=flip)
    flipper.start()
    try:
        results = _concurrently(lambda i: [run() for _ in range(20)], THREADS)
    finally:
        stop.set()
        flipper.join()
        for name in ("cpu_path", "cpu_isa"):
            _C.set_knob(name, before[name])
    for i, runs in enumerate(results):
        for r, got in enumerate(runs):
            for k, (a, b) in enumerate(zip(got, expected)):
                torch.testing.assert_close(
                    a, b, rtol=1e-12, atol=1e-12, msg=lambda m: f"thread {i} round {r} tensor {k}: {m}"
                )
