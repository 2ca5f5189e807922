"""Shared fixtures: every available backend joins every parametrized test by being registered."""

import pytest
import torch

import myrnn_fast

AVAILABLE = myrnn_fast.available_backends()


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
