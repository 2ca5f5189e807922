"""Shared fixtures: every available backend joins every parametrized test by being registered."""

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

import myrnn_fast

AVAILABLE = myrnn_fast.available_backends()

# Property-based tests (test_fuzz.py): a fixed, modest set of examples by default so every run
# sees the same cases; HYPOTHESIS_PROFILE=long explores far more, fresh each run, by hand. The
# only function-scoped fixtures those tests use are the backend name and the default-restoring
# one below, which need no reset between examples.
_FIXTURES_OK = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
settings.register_profile(
    "ci", derandomize=True, max_examples=50, deadline=None, database=None,
    suppress_health_check=_FIXTURES_OK, print_blob=True,
)
settings.register_profile(
    "long", max_examples=2000, deadline=None, suppress_health_check=_FIXTURES_OK, print_blob=True
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_report_header(config):
    return f"myrnn_fast {myrnn_fast.__version__}: backends {', '.join(AVAILABLE)}; torch {torch.__version__}"


@pytest.fixture(params=AVAILABLE)
def backend(request):
    return request.param


@pytest.fixture(autouse=True)
def _isolate_backend_default():
    """Tests that change the process default must not leak it into other tests."""
    before = myrnn_fast.get_backend()
    yield
    myrnn_fast.registry._default = before
