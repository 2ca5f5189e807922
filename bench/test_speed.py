"""pytest-benchmark suite: backends x shapes x passes, grouped by shape and pass so that each table
compares every backend with torch.nn on the same work. Not part of the default test run:

    pytest bench/ --benchmark-only --benchmark-group-by=group --benchmark-save=NAME
"""

import pytest

from workloads import PASSES, SHAPES, implementations, skip_reason, workload


@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}-B{}-I{}-H{}".format(*s))
@pytest.mark.parametrize("impl", implementations())
def test_speed(benchmark, impl, shape, pass_):
    reason = skip_reason(impl, shape)
    if reason:
        pytest.skip(reason)
    fn = workload(impl, shape, pass_)
    for _ in range(3):  # warm-up outside the timing: first-call allocation, JIT compilation
        fn()
    benchmark.group = f"{pass_} T={shape[0]} B={shape[1]} I={shape[2]} H={shape[3]}"
    benchmark.pedantic(fn, rounds=15, iterations=1, warmup_rounds=0)
