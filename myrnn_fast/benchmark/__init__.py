"""Benchmarks: ``myrnn-fast bench`` and the pytest-benchmark suites in ``bench/`` share this code.

- ``workloads``: shapes, presets, passes, one timed callable per (implementation, shape, pass), FLOPs;
- ``timing``: warm-up, interleaved rounds under a time budget, statistics, the GEMM peak;
- ``machine``: where the numbers come from;
- ``runner``: a grid of shapes x passes over the baseline and the backends;
- ``report``: ``report.md``, ``report.json``, ``speedup.png``;
- ``command``: the ``bench`` subcommand.

    from myrnn_fast import benchmark
    result = benchmark.run(benchmark.Grid.preset("quick"))
    benchmark.write(result, "bench-out")
"""

from .report import write
from .runner import Grid, run

__all__ = ["Grid", "run", "write"]
