"""Timing: warm-up outside the clock, interleaved rounds, robust statistics, the GEMM peak.

Implementations timed together run interleaved: every round times each of them once, in an order
that rotates from round to round, so slow drift of the machine (other processes, clock changes)
hits all of them alike and cancels in their ratio. The number of rounds follows a time budget, so
adding implementations does not stretch a run without bound.
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

WARMUP_CALLS = 3  # first-call allocation, Numba's JIT compilation, MKL/cuDNN plan selection
MIN_SAMPLE_S = 1e-3  # a sample repeats a fast call until it lasts this long, above timer noise
MAX_CALLS_PER_SAMPLE = 1000
SLOW_CALL_S = 0.2  # past this, one call after the first is warm-up enough


@dataclass
class Timing:
    """Seconds per call, one value per round."""

    samples: list[float]
    calls_per_round: int

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def quartiles(self) -> tuple[float, float]:
        if len(self.samples) < 2:
            return self.samples[0], self.samples[0]
        q1, _, q3 = statistics.quantiles(self.samples, n=4, method="inclusive")
        return q1, q3

    def summary(self) -> dict:
        q1, q3 = self.quartiles
        return {
            "median_ms": self.median * 1e3,
            "min_ms": min(self.samples) * 1e3,
            "q1_ms": q1 * 1e3,
            "q3_ms": q3 * 1e3,
            "iqr_ms": (q3 - q1) * 1e3,
            "rounds": len(self.samples),
            "calls_per_round": self.calls_per_round,
        }


def format_ms(value: float) -> str:
    """Milliseconds with three significant digits or more, never in exponent form."""
    for limit, digits in ((100, 0), (10, 1), (1, 2)):
        if value >= limit:
            return f"{value:.{digits}f}"
    return f"{value:.3f}"


def grad_mode(fn: Callable[[], object]) -> torch.set_grad_enabled:
    """The autograd mode to call ``fn`` in. A workload marked ``grad_enabled = False`` runs with
    autograd off around whole samples rather than entering ``no_grad`` inside each call: that
    context costs about a microsecond, as much as a whole RNNCell step of a fast backend."""
    return torch.set_grad_enabled(getattr(fn, "grad_enabled", True))


def _sample(fn: Callable[[], object], calls: int, warm: bool = True) -> float:
    with grad_mode(fn):
        if warm:
            # One call off the clock: the implementation timed before this one (another library's
            # thread pool, its data in the caches) must not land on this sample's first call. On
            # a shared virtual machine a call after 10 ms of other work (even a Python loop that
            # touches no memory: the vCPU is preempted, and its caches refilled by whatever ran)
            # took up to 2x its time in a loop of calls; the first call of a sample pays that.
            fn()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        return (time.perf_counter() - start) / calls


def calibrate(fn: Callable[[], object], warmup: int = WARMUP_CALLS) -> tuple[float, int]:
    """Warm ``fn`` up with up to ``warmup`` calls (at least two), then say one call's seconds and how
    many calls make one sample. The first call (JIT compilation, first-touch allocation) is never
    timed; after it, one slow call is warm-up enough, and the last warm-up call is the estimate."""
    with grad_mode(fn):
        fn()
    estimate = _sample(fn, 1, warm=False)
    for _ in range(warmup - 2):
        if estimate > SLOW_CALL_S:
            break
        estimate = _sample(fn, 1, warm=False)
    if estimate < MIN_SAMPLE_S:  # a fast call: estimate again over enough calls to trust it
        estimate = _sample(fn, min(MAX_CALLS_PER_SAMPLE, math.ceil(MIN_SAMPLE_S / max(estimate, 1e-9))))
    calls = min(MAX_CALLS_PER_SAMPLE, max(1, math.ceil(MIN_SAMPLE_S / max(estimate, 1e-9))))
    return estimate, calls


def warms(estimate: float) -> bool:
    """Whether a sample starts with a call off the clock: always, but for calls so slow (beyond
    ``SLOW_CALL_S``) that doubling their time would crowd out rounds, and where a cold start is a
    small share of the call."""
    return estimate <= SLOW_CALL_S


def rounds_for(seconds_per_round: float, budget_s: float, min_rounds: int, max_rounds: int) -> int:
    return max(min_rounds, min(max_rounds, int(budget_s / max(seconds_per_round, 1e-9))))


def interleaved(
    fns: dict[str, Callable[[], object]],
    budget_s: float,
    min_rounds: int = 5,
    max_rounds: int = 200,
    warmup: int = WARMUP_CALLS,
) -> dict[str, Timing]:
    """Time every callable in ``fns`` once per round, interleaved, for about ``budget_s`` seconds.

    Rounds go on until the budget is spent (at least ``min_rounds``, at most ``max_rounds``),
    measured on the clock rather than predicted from the warm-up: on a busy machine calls slow
    down, and a run must not stretch with them.
    """
    names = list(fns)
    calibrated = {name: calibrate(fns[name], warmup) for name in names}
    calls = {name: c for name, (_, c) in calibrated.items()}
    warm = {name: warms(estimate) for name, (estimate, _) in calibrated.items()}
    samples = {name: [] for name in names}
    gc.collect()
    gc.disable()  # a collection pause would land on whichever call triggered it
    try:
        start = time.perf_counter()
        for r in range(max_rounds):
            for i in range(len(names)):
                name = names[(r + i) % len(names)]
                samples[name].append(_sample(fns[name], calls[name], warm[name]))
            if r + 1 >= min_rounds and time.perf_counter() - start >= budget_s:
                break
    finally:
        gc.enable()
    return {name: Timing(samples[name], calls[name]) for name in names}


def gemm_peak(device="cpu", dtype=torch.float32, sizes=(256, 512, 1024, 2048), repeats: int = 3) -> dict:
    """The machine's measured matrix-multiply peak: best median GFLOP/s of square ``torch.mm``."""
    device = torch.device(device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    best, best_n = 0.0, None
    for n in sizes:
        a = torch.randn(n, n, dtype=dtype, device=device)
        b = torch.randn(n, n, dtype=dtype, device=device)
        out = torch.empty(n, n, dtype=dtype, device=device)

        def mm():
            torch.mm(a, b, out=out)
            sync()

        _, calls = calibrate(mm, warmup=1)
        seconds = statistics.median(_sample(mm, calls) for _ in range(repeats))
        gflops = 2 * n**3 / seconds / 1e9
        if gflops > best:
            best, best_n = gflops, n
    return {"gflops": best, "n": best_n, "dtype": str(dtype).removeprefix("torch."), "device": str(device)}
