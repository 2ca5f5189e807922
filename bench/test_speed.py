"""pytest-benchmark suite: torch.nn and every backend x shapes x passes, grouped by shape and pass so
that each table compares every implementation on the same work. Not part of the default test run
(``testpaths`` is ``tests``); the grid is in ``conftest.py``, the workloads in ``myrnn_fast.benchmark``.

    pytest bench/ --benchmark-only --benchmark-group-by=group --benchmark-save=NAME
    pytest-benchmark compare 0001 0002 --group-by=group      # two saved runs side by side
"""

from myrnn_fast.benchmark import timing, workloads

SECONDS_PER_CASE = 1.0  # of timed rounds; at least MIN_ROUNDS however long a call takes
MIN_ROUNDS = 5


def test_speed(benchmark, case, bench_device):
    impl, shape, pass_ = case
    fn = workloads.workload(impl, shape, pass_, bench_device)
    # Warm-up outside the timing (first-call allocation, Numba's JIT); fast calls repeat per round.
    estimate, calls = timing.calibrate(fn)
    rounds = timing.rounds_for(estimate * calls, SECONDS_PER_CASE, MIN_ROUNDS, 200)
    benchmark.group = f"{pass_} T,B,I,H = {workloads.label(shape)}"
    benchmark.extra_info.update(implementation=impl, flops=workloads.flops(shape, pass_), device=bench_device)
    with timing.grad_mode(fn):  # fwd and cell run with autograd off
        benchmark.pedantic(fn, rounds=rounds, iterations=calls, warmup_rounds=0)
