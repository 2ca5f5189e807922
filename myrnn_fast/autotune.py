"""The ``cpp`` backend's CPU paths, chosen by measurement (knob ``cpu_autotune``).

Five choices are made this way, each per kind of call (see ``_KEY``):

- ``pass`` ``forward`` and ``backward``: the recurrence, by the register tiles or one BLAS GEMM per
  step (knob ``cpu_path``);
- ``pass`` ``grads`` and ``grads+dx``: the backward's weight gradients (and the input's, for
  ``grads+dx``), summed in the kernels or formed by ATen GEMMs (knob ``cpu_grads``);
- ``pass`` ``cell``: an RNNCell step, by the kernels' dot products or ATen GEMMs (knob ``cpu_cell``);
- ``pass`` ``projection``: the forward's input projection of every step (input size above 1), by
  the kernels' register tiles or one ATen GEMM (knob ``cpu_projection``);
- ``pass`` ``bf16 forward`` and ``bf16 backward``: with AVX512-BF16, a bfloat16 recurrence on the tiles
  by ``vdpbf16ps`` pairs or by FMAs on float32 copies (knob ``cpu_bf16_products``).

Under those knobs' ``auto`` with ``cpu_autotune`` 1 (the defaults), the first call of each kind
(pass, hidden size, input size but for the recurrences, batch and sequence length each rounded
up to a power of two, dtype, thread count, instruction set) runs both candidates on its own data, returns
the faster one's result and remembers the choice for the rest of the process, as
``torch.backends.cudnn.benchmark`` does for cuDNN. ``cpu_autotune`` 0 restores the fixed size
thresholds (``cpu_tiles_max_hidden``, ``cpu_tiles_max_batch``, ``cpu_grads_kernels_max_work``,
``cpu_parallel_min_work`` for the cell); a forced ``cpu_path``, ``cpu_grads``, ``cpu_cell``,
``cpu_projection`` or ``cpu_bf16_products`` bypasses the cache.

    from myrnn_fast import autotune
    autotune.choices()          # [{"pass", "hidden", "input", "batch_max", "steps_max", "dtype", "threads",
                                #   "isa", "path", "times_ms"}, ...]
    autotune.save("paths.json"); autotune.load("paths.json")

With knob ``cpu_autotune_file`` (``MYRNN_CPU_AUTOTUNE_FILE``) naming a file, the choices saved there
on the same machine are loaded when the ``cpp`` backend is first used, and the process's choices
are written back to it when the process exits.
"""

from __future__ import annotations

import atexit
import json
import os
import platform
import tempfile
from pathlib import Path
from typing import Any

from . import config

__all__ = ["choices", "clear", "save", "load"]

_FORMAT = 2
# What a choice is for; "input" is 0 for the recurrences' passes, which never read it, and
# "steps_max" 1 for the cell's.
_KEY = ("pass", "hidden", "input", "batch_max", "steps_max", "dtype", "threads", "isa")


_ext = None  # myrnn_fast._C, once the cpp backend has loaded it (bind)


def _extension():
    if _ext is None:
        from .backends import _cpp  # loading the backend binds this module (see bind)

        if _ext is None:
            raise RuntimeError(f"autotuning is the cpp backend's: {_cpp.unavailable_reason()}")
    return _ext


def choices() -> list[dict[str, Any]]:
    """The path chosen for each kind of call so far in this process, with the times measured
    (``times_ms``: each candidate's better of two runs, by path name; empty for choices loaded
    from a file). Empty when the ``cpp`` backend cannot load."""
    try:
        return list(_extension().autotune_cache())
    except RuntimeError:
        return []


def clear() -> None:
    """Forget every choice: the next call of each kind measures again."""
    _extension().autotune_clear()


def _machine() -> dict[str, Any]:
    """What a saved choice is only valid on: the same CPU model and the same torch (its BLAS)."""
    import torch

    from .benchmark.machine import _cpuinfo, cpu_model

    return {"cpu": cpu_model(_cpuinfo()), "torch": torch.__version__, "machine": platform.machine()}


def save(path: str | os.PathLike) -> int:
    """Write this process's choices (merged over those already in the file from the same machine) to
    ``path``, atomically; returns how many the file holds."""
    path = Path(path)
    merged = {tuple(entry[k] for k in _KEY): entry for entry in _read(path)}
    for entry in choices():
        merged[tuple(entry[k] for k in _KEY)] = {k: entry[k] for k in (*_KEY, "path")}
    data = {"format": _FORMAT, "machine": _machine(), "choices": list(merged.values())}
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=path.name, suffix=".tmp", delete=False) as f:
        json.dump(data, f, indent=1)
    os.replace(f.name, path)
    return len(merged)


def _read(path: Path) -> list[dict[str, Any]]:
    """The choices in ``path`` if it exists and was written on this machine, else none."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    if not isinstance(data, dict) or data.get("format") != _FORMAT or data.get("machine") != _machine():
        return []
    return [entry for entry in data.get("choices", []) if isinstance(entry, dict)]


def load(path: str | os.PathLike) -> int:
    """Adopt the choices saved in ``path`` on this machine (kinds measured already keep theirs);
    a missing file, another machine's or an unreadable one adds none. Returns how many it held."""
    _C = _extension()
    entries = _read(Path(path))
    for entry in entries:
        try:
            _C.autotune_record(*(entry[k] for k in _KEY), entry["path"])
        except (KeyError, TypeError, ValueError, RuntimeError):
            continue  # a damaged entry is skipped; that kind is measured again
    return len(entries)


_bound_file: list[str] = []  # the file that the process's choices go to at exit, if any


def _save_at_exit() -> None:
    if _bound_file and choices():
        save(_bound_file[0])


def _apply_file(name: str, value: str) -> None:
    """Knob ``cpu_autotune_file``: load its choices now, save the process's to it at exit."""
    if name != "cpu_autotune_file":
        return
    _bound_file.clear()
    if value:
        load(value)
        _bound_file.append(value)


def bind(extension) -> None:
    """Called by the ``cpp`` backend once it has loaded its extension."""
    global _ext
    _ext = extension
    atexit.register(_save_at_exit)
    config.bind("autotune", _apply_file)
