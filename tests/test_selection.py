"""Backend selection: names, availability, the process default, the env var, per-module override."""

import os
import subprocess
import sys

import pytest
import torch

import myrnn_fast
from myrnn_fast import registry

UNAVAILABLE = [name for name in myrnn_fast.BACKENDS if name not in myrnn_fast.available_backends()]


def test_public_names():
    assert myrnn_fast.BACKENDS == ("reference", "torch", "numba", "cpp")
    available = myrnn_fast.available_backends()
    assert {"reference", "torch"} <= set(available)
    assert available == [b for b in myrnn_fast.BACKENDS if b in available]  # BACKENDS order


def test_auto_never_picks_the_reference_loop_when_something_faster_exists():
    myrnn_fast.set_backend("auto")
    assert myrnn_fast.resolve_backend("cpu") != "reference"
    assert myrnn_fast.resolve_backend("cpu", "auto") == myrnn_fast.resolve_backend("cpu")
    assert myrnn_fast.resolve_backend(torch.device("cpu")) == myrnn_fast.resolve_backend(None)


@pytest.mark.parametrize("call", [myrnn_fast.set_backend, myrnn_fast.use_backend,
                                  lambda n: myrnn_fast.RNN(2, 3, backend=n),
                                  lambda n: myrnn_fast.RNNCell(2, 3, backend=n),
                                  lambda n: myrnn_fast.resolve_backend("cpu", n)])
def test_unknown_name_lists_every_valid_name(call):
    with pytest.raises(ValueError) as info:
        result = call("cuDNN")
        if hasattr(result, "__enter__"):
            result.__enter__()
    for name in ("auto", *myrnn_fast.BACKENDS):
        assert name in str(info.value)


@pytest.mark.skipif(not UNAVAILABLE, reason="every backend is available in this install")
@pytest.mark.parametrize("name", UNAVAILABLE)
def test_unavailable_backend_named_explicitly_is_an_error_that_says_why(name):
    reason = registry.unavailable_reason(name)
    assert reason
    before = myrnn_fast.get_backend()
    for call in (lambda: myrnn_fast.set_backend(name), lambda: myrnn_fast.RNN(2, 3, backend=name),
                 lambda: myrnn_fast.resolve_backend("cpu", name)):
        with pytest.raises(myrnn_fast.BackendUnavailableError) as info:
            call()
        assert reason in str(info.value)
        assert "Available here" in str(info.value)
    assert myrnn_fast.get_backend() == before  # a refused set_backend changes nothing


def test_set_get_and_context_manager(backend):
    myrnn_fast.set_backend(backend)
    assert myrnn_fast.get_backend() == backend
    assert myrnn_fast.resolve_backend("cpu") == backend
    myrnn_fast.set_backend("auto")
    with myrnn_fast.use_backend(backend) as name:
        assert name == backend == myrnn_fast.get_backend()
    assert myrnn_fast.get_backend() == "auto"
    with pytest.raises(KeyError):
        with myrnn_fast.use_backend(backend):
            raise KeyError("restored on the way out of an exception too")
    assert myrnn_fast.get_backend() == "auto"


def _spy(monkeypatch):
    """Record which backend's layer/cell each call reaches."""
    calls = []
    for name in myrnn_fast.available_backends():
        impl = registry.implementation(name)
        for fn in ("layer", "cell"):
            if hasattr(impl, fn):
                original = getattr(impl, fn)

                def wrapper(*args, _original=original, _name=name, **kwargs):
                    calls.append(_name)
                    return _original(*args, **kwargs)

                monkeypatch.setattr(impl, fn, wrapper)
    return calls


def test_default_and_module_override_reach_the_right_kernel(monkeypatch):
    calls = _spy(monkeypatch)
    x = torch.randn(3, 2, 2)
    follows, pinned = myrnn_fast.RNN(2, 3), myrnn_fast.RNN(2, 3, backend="reference")
    cell = myrnn_fast.RNNCell(2, 3)
    with myrnn_fast.use_backend("torch"):
        follows(x), pinned(x), cell(x[0])
    assert calls == ["torch", "reference", "torch"]
    calls.clear()
    with myrnn_fast.use_backend("reference"):
        follows(x), cell(x[0])
    assert calls == ["reference", "reference"]
    calls.clear()
    pinned.backend = "torch"  # the choice is read at every call, not cached
    pinned(x)
    assert calls == ["torch"]


def _python(code, **env):
    environment = {k: v for k, v in os.environ.items() if k != "MYRNN_BACKEND"} | env
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environment)


def test_environment_variable_sets_the_default():
    code = "import myrnn_fast; print(myrnn_fast.get_backend(), myrnn_fast.resolve_backend('cpu'))"
    assert _python(code).stdout.split() == ["auto", myrnn_fast.resolve_backend("cpu", "auto")]
    assert _python(code, MYRNN_BACKEND="reference").stdout.split() == ["reference", "reference"]
    assert _python(code, MYRNN_BACKEND="auto").stdout.split()[0] == "auto"


def test_environment_variable_with_a_bad_name_fails_loudly():
    result = _python("import myrnn_fast", MYRNN_BACKEND="fastest")
    assert result.returncode != 0
    assert "MYRNN_BACKEND" in result.stderr and "ValueError" in result.stderr
    for name in myrnn_fast.BACKENDS:
        assert name in result.stderr


@pytest.mark.parametrize("missing", ["myrnn_fast._C", "numba"])
def test_a_backend_that_does_not_load_leaves_the_others_working(missing):
    # As on a machine where the extension was not built (or numba is not installed): the backend
    # is reported unavailable with the reason, auto picks another one, and nothing else breaks.
    name = "cpp" if missing == "myrnn_fast._C" else "numba"
    code = (
        f"import sys; sys.modules[{missing!r}] = None\n"  # makes that import fail
        "import torch, myrnn_fast\n"
        f"assert {name!r} not in myrnn_fast.available_backends()\n"
        f"print(myrnn_fast.registry.unavailable_reason({name!r}))\n"
        "rnn = myrnn_fast.RNN(2, 3)\n"
        "out, h = rnn(torch.randn(4, 1, 2, requires_grad=True))\n"
        "out.sum().backward()\n"
        f"assert myrnn_fast.resolve_backend('cpu') not in ({name!r}, 'reference')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "install" in result.stdout or "build" in result.stdout
