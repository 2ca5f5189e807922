"""Backend registry: which implementation of the kernel contract runs, and why.

Every backend is a module under ``myrnn_fast.backends`` that provides

- ``DEVICE_TYPES``: the tensor device types it runs on (``None`` for any device torch runs on);
- ``unavailable_reason() -> str | None``: ``None`` when usable in this install, otherwise a
  sentence saying why not and how to get it;
- ``layer(...)`` (and optionally ``cell(...)``), the kernel contract of ``myrnn_fast.backends``.

The process default is the ``backend`` knob of :mod:`myrnn_fast.config` (``MYRNN_BACKEND`` at
import time, ``auto`` when unset), changed with :func:`set_backend` (or ``config.set``) or, for a
block, :func:`use_backend`; a module's ``backend=`` argument overrides it for that module.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
from collections.abc import Iterator
from types import ModuleType

import torch

from . import config, export
from .config import BACKENDS

AUTO = "auto"

# What `auto` tries, fastest first. The reference loop comes last: it is the oracle, not a choice.
_AUTO_ORDER = ("cpp", "numba", "torch", "reference")

_MODULES = {
    "reference": "myrnn_fast.backends._reference",
    "torch": "myrnn_fast.backends._torch",
    "numba": "myrnn_fast.backends._numba",
    "cpp": "myrnn_fast.backends._cpp",
}


class BackendUnavailableError(RuntimeError):
    """A backend was named explicitly but cannot run here (not installed, not built, wrong device)."""


def check_name(name: str, *, allow_auto: bool = True) -> str:
    valid = ((AUTO,) if allow_auto else ()) + BACKENDS
    if not isinstance(name, str) or name not in valid:
        raise ValueError(f"unknown backend {name!r}; valid names are: {', '.join(valid)}")
    return name


# Backend modules imported so far, by name: a plain dict, which torch.compile reads as a constant.
_LOADED: dict[str, ModuleType] = {}


def _load(name: str) -> ModuleType | None:
    if name not in _LOADED:
        path = _MODULES.get(name)
        if path is None:
            return None
        _LOADED[name] = importlib.import_module(path)
    return _LOADED[name]


def unavailable_reason(name: str) -> str | None:
    """Why backend ``name`` cannot run in this install, or ``None`` if it can."""
    return _unavailable_reason(check_name(name, allow_auto=False))


@functools.cache  # an install does not change under a running process
def _unavailable_reason(name: str) -> str | None:
    try:
        module = _load(name)
    except ImportError as exc:  # a broken install; say so rather than hide the backend
        return f"importing it failed: {exc}"
    return module.unavailable_reason()


def available_backends() -> list[str]:
    """The backends usable in this install, in ``BACKENDS`` order."""
    return [name for name in BACKENDS if unavailable_reason(name) is None]


def _require(name: str) -> ModuleType:
    reason = unavailable_reason(name)
    if reason is not None:
        raise BackendUnavailableError(
            f"backend {name!r} is not available: {reason}. "
            f"Available here: {', '.join(available_backends())} (or 'auto')."
        )
    return _load(name)


def _runs_on(name: str, device_type: str) -> bool:
    types = _load(name).DEVICE_TYPES
    return types is None or device_type in types


# The process default, mirrored from the config knob: a plain global is what torch.compile guards
# on cheaply, and the hot path reads it on every call.
_default: str = config.get("backend")


def _apply_default(knob: str, name: str) -> None:
    global _default
    if name != AUTO:
        _require(name)  # an unusable backend is refused, and config keeps the previous value
    _default = name


config.bind("registry", _apply_default, now=False)  # the import only checks the name


def get_backend() -> str:
    """The process default: ``'auto'`` or a backend name."""
    return _default


def set_backend(name: str) -> None:
    """Set the process default to ``'auto'`` or a backend name that is usable here."""
    config.set("backend", check_name(name))


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[str]:
    """``with use_backend("torch"): ...`` sets the process default and restores it on exit."""
    with config.override(backend=check_name(name)):
        yield name


def resolve_backend(device: torch.device | str | None = None, name: str | None = None) -> str:
    """The concrete backend that runs for tensors on ``device``.

    ``name`` is a module's own choice (``None`` follows the process default). ``auto`` picks the
    fastest usable backend for the device type; an explicit name that cannot run there is an error.
    """
    device_type = torch.device(device if device is not None else "cpu").type
    requested = check_name(name) if name is not None else _default
    return _resolve(requested, device_type)[0]


def kernels(device: torch.device, name: str | None = None) -> ModuleType:
    """The backend module that runs for tensors on ``device``: :func:`resolve_backend` for the
    modules' forward, where it runs on every call and so is cached."""
    requested = _default if name is None else name
    if not torch.compiler.is_compiling():
        if torch._C._is_tracing():  # torch.jit.trace records the extension's op (myrnn_fast.export)
            return export
        found = _KERNELS.get((requested, device.type))  # the hot path: one lookup once resolved
        if found is not None:
            return found
    elif torch.compiler.is_exporting():  # so does torch.export, whatever the backend
        return export
    # While dynamo traces, _resolved_name runs eagerly and may fill _KERNELS: a guard on that
    # dict read before it would fail on the frame that created it. _LOADED is read after.
    return _LOADED[_resolved_name(requested, device.type)]


_KERNELS: dict[tuple[str, str], ModuleType] = {}  # (requested name, device type) -> module


def cpu_kernels(name: str | None) -> ModuleType | None:
    """What :func:`kernels` returns for CPU tensors, without its checks for compiling and tracing
    (for a caller that has made them), or ``None`` where ``name`` cannot run on the CPU: the
    caller's own path then raises :func:`kernels`'s error."""
    requested = _default if name is None else name
    found = _KERNELS.get((requested, "cpu"))
    if found is not None:
        return found
    try:
        return _resolve(requested, "cpu")[1]
    except (BackendUnavailableError, ValueError):
        return None


# torch.compile must not trace the lookup (it imports modules): dynamo runs this eagerly while
# tracing and keeps the answer as a constant; the guard on `_default` recompiles on a change.
@torch.compiler.assume_constant_result
def _resolved_name(requested: str, device_type: str) -> str:
    return _resolve(requested, device_type)[0]


@functools.cache  # availability is fixed per process, so the answer is too
def _resolve(requested: str, device_type: str) -> tuple[str, ModuleType]:
    check_name(requested)
    if requested == AUTO:
        for candidate in _AUTO_ORDER:
            if unavailable_reason(candidate) is None and _runs_on(candidate, device_type):
                _KERNELS[requested, device_type] = _load(candidate)
                return candidate, _load(candidate)
        raise BackendUnavailableError(f"no backend runs on {device_type!r} tensors")
    module = _require(requested)
    if not _runs_on(requested, device_type):
        others = [n for n in available_backends() if _runs_on(n, device_type)]
        raise BackendUnavailableError(
            f"backend {requested!r} does not run on {device_type!r} tensors "
            f"(it runs on: {', '.join(module.DEVICE_TYPES)}); "
            f"backends for {device_type!r}: {', '.join(others)}"
        )
    _KERNELS[requested, device_type] = module
    return requested, module


def implementation(name: str) -> ModuleType:
    """The module implementing backend ``name`` (which must be usable)."""
    return _require(check_name(name, allow_auto=False))
