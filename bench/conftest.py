"""The pytest-benchmark suite's grid: implementations x shapes x passes, from ``myrnn_fast.benchmark``.

    pytest bench/ --benchmark-only --benchmark-group-by=group                 # the full preset's shapes, CPU
    pytest bench/ --bench-preset quick --bench-device cuda --benchmark-only   # fewer shapes, on the GPU
"""

import pytest
import torch

from myrnn_fast import registry
from myrnn_fast.benchmark import workloads


def pytest_addoption(parser):
    group = parser.getgroup("myrnn_fast bench")
    group.addoption("--bench-preset", choices=list(workloads.PRESETS), default="full",
                    help="whose shapes to time (default: full)")
    group.addoption("--bench-device", choices=("cpu", "cuda"), default="cpu",
                    help="where the tensors live (cuda: the baseline is cuDNN's RNN)")


@pytest.fixture(scope="session")
def bench_device(request):
    device = request.config.getoption("--bench-device")
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("--bench-device cuda: torch sees no CUDA device here")
    return device


def pytest_generate_tests(metafunc):
    if "case" not in metafunc.fixturenames:
        return
    config = metafunc.config
    device = config.getoption("--bench-device")
    shapes = workloads.PRESETS[config.getoption("--bench-preset")]["shapes"]
    _, unusable = workloads.select_backends(None, device)  # every backend: these show as skipped
    cases = []
    for shape in shapes:
        for pass_ in workloads.PASSES:
            for impl in [workloads.baseline(pass_), *registry.BACKENDS]:
                reason = unusable.get(impl) or workloads.skip_reason(impl, shape, pass_)
                marks = [pytest.mark.skip(reason=reason)] if reason else []
                ident = f"{pass_}-T{shape[0]}-B{shape[1]}-I{shape[2]}-H{shape[3]}-{impl}"
                cases.append(pytest.param((impl, shape, pass_), id=ident, marks=marks))
    metafunc.parametrize("case", cases)


def pytest_collection_modifyitems(items):
    """The reference loop's cases run last: its allocation churn would slow whatever runs next."""
    items.sort(key=lambda item: "-reference" in item.nodeid)
