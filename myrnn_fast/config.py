"""Every knob of myrnn_fast in one place: its name, type, default, environment variable and meaning.

    from myrnn_fast import config
    config.get("cpu_path")                       # 'auto'
    config.set("cpu_path", "gemm")               # ValueError listing the valid values if not one
    with config.override(cpu_path="tiles"):      # restored on exit
        ...

Each knob's environment variable (``MYRNN_<NAME>``) sets its value when ``myrnn_fast`` is
imported; a bad value fails the import with the valid ones. Setting a knob changes nothing in
the process beyond this module until the backend that owns it is first used: the owner binds
itself here (:func:`bind`) and from then on receives every value, the current one first.
``myrnn-fast info`` prints the table (:func:`describe`).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

__all__ = ["Knob", "KNOBS", "get", "set", "override", "describe", "bind"]


@dataclass(frozen=True)
class Knob:
    name: str
    type: type  # str or int
    default: Any
    owner: str  # what reads it: "registry", "cpp", "cuda" (the cpp backend built with CUDA), "numba", "autotune"
    help: str
    choices: tuple | None = None  # the valid values of a str knob, or of an int knob with few values
    minimum: int | None = None  # the smallest valid value of an int knob

    @property
    def env(self) -> str:
        return "MYRNN_" + self.name.upper()

    def validate(self, value: Any) -> Any:
        if self.type is int:
            if isinstance(value, str):
                try:
                    value = int(value.strip(), 0)
                except ValueError:
                    raise ValueError(f"{self.name} must be an integer, got {value!r}") from None
            elif isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{self.name} must be an integer, got {value!r}")
        elif not isinstance(value, str):
            raise ValueError(f"{self.name} must be a string, got {value!r}")
        if self.choices is not None and value not in self.choices:
            valid = ", ".join(map(str, self.choices))
            raise ValueError(f"unknown {self.name} {value!r}; valid values are: {valid}")
        if self.minimum is not None and value < self.minimum:
            raise ValueError(f"{self.name} must be at least {self.minimum}, got {value}")
        return value


# The backend names live here rather than in registry.py so that this module imports nothing.
BACKENDS = ("reference", "torch", "numba", "cpp")

KNOBS: dict[str, Knob] = {
    k.name: k
    for k in (
        Knob("backend", str, "auto", "registry",
             "process default backend: auto (the fastest usable one for the device) or a name",
             choices=("auto", *BACKENDS)),
        Knob("cpu_isa", str, "auto", "cpp",
             "instruction set of the cpp CPU kernels: auto (the best this CPU has) or one it has",
             choices=("auto", "baseline", "avx2", "avx512", "avx512bf16")),
        Knob("cpu_path", str, "auto", "cpp",
             "cpp CPU recurrence: tiles (register-tiled kernels), gemm (one BLAS GEMM a step), "
             "auto (measured per kind of call, or by cpu_tiles_max_hidden / cpu_tiles_max_batch "
             "with cpu_autotune 0)",
             choices=("auto", "tiles", "gemm")),
        Knob("cpu_tiles_max_hidden", int, 512, "cpp",
             "auto runs the register tiles up to this hidden size ...", minimum=0),
        Knob("cpu_tiles_max_batch", int, 16, "cpp",
             "... and beyond it for batches of 2 to this many rows (each 4-row tile streams W_hh "
             "from cache, so wide batches amortize it better in a GEMM)", minimum=0),
        Knob("cpu_autotune", int, 1, "cpp",
             "1: under cpu_path, cpu_grads, cpu_cell and cpu_projection auto, the first call of each kind "
             "(pass, hidden size, batch and length up to powers of two, dtype, threads, "
             "instruction set; the input size but for the recurrences) times both candidates and "
             "keeps the faster for the process (myrnn_fast.autotune); 0: the size thresholds "
             "decide, the same way every run",
             choices=(0, 1)),
        Knob("cpu_autotune_file", str, "", "autotune",
             "a JSON file of cpu_autotune's choices: those saved there on this machine (same CPU "
             "model and torch) are loaded when the cpp backend is first used, and the process's "
             "are written back at exit; empty: choices live only in the process"),
        Knob("cpu_grads", str, "auto", "cpp",
             "cpp CPU backward's weight gradients: kernels (register tiles, no GEMM calls), gemm "
             "(ATen GEMMs), auto (measured per kind of call, or kernels up to "
             "cpu_grads_kernels_max_work with cpu_autotune 0; kernels always for a 16-bit dtype "
             "whose ATen GEMM is slow)",
             choices=("auto", "kernels", "gemm")),
        Knob("cpu_grads_kernels_max_work", int, 1 << 20, "cpp",
             "multiply-adds of the weight gradients up to which cpu_grads auto forms them in the "
             "kernels with cpu_autotune 0 (each ATen GEMM costs microseconds of fixed overhead)", minimum=0),
        Knob("cpu_cell", str, "auto", "cpp",
             "cpp CPU RNNCell step: kernels (one pass of dot products, no GEMM call), gemm (ATen "
             "GEMMs), auto (measured per kind of call, or kernels up to cpu_parallel_min_work "
             "multiply-adds, 8 times that with AVX512-BF16 in bfloat16, with cpu_autotune 0)",
             choices=("auto", "kernels", "gemm")),
        Knob("cpu_projection", str, "auto", "cpp",
             "cpp CPU forward's input projection x W_ih^T + b (input size above 1): kernels "
             "(register tiles, no GEMM call), gemm (one ATen GEMM), auto (measured per kind of call, "
             "or gemm with cpu_autotune 0, kernels for a 16-bit dtype whose ATen GEMM is slow)",
             choices=("auto", "kernels", "gemm")),
        Knob("cpu_parallel_min_work", int, 1 << 17, "cpp",
             "multiply-adds below which a cpp CPU call stays on the calling thread (waking the "
             "pool costs more)", minimum=0),
        Knob("cpu_cell_gil_release_min_work", int, 1 << 16, "cpp",
             "multiply-adds from which a no-grad cpp RNNCell step releases the GIL", minimum=0),
        Knob("cpu_bf16_products", str, "auto", "cpp",
             "cpp CPU bfloat16 recurrences with AVX512-BF16: pairs (vdpbf16ps on the bfloat16 "
             "state and W_hh), float32 (FMAs on float32 copies of both; results identical up to "
             "summation order), auto (measured per kind of call, or float32 with cpu_autotune 0)",
             choices=("auto", "pairs", "float32")),
        Knob("cuda_path", str, "auto", "cuda",
             "cpp CUDA recurrence: registers / shared (persistent kernels, W_hh in registers or "
             "shared memory), gemm (one cuBLAS GEMM a step), auto (persistent where it fits)",
             choices=("auto", "registers", "shared", "gemm")),
        Knob("cuda_rows_per_block", int, 0, "cuda",
             "batch rows per persistent CUDA block: 1, 2, 4 or 8, or 0 to choose per call",
             choices=(0, 1, 2, 4, 8)),
        Knob("numba_gemm_min_hidden", int, 128, "numba",
             "hidden size from which the numba kernels do each step's product as one BLAS call "
             "(below it the hand loops keep W_hh in L1/L2 and pay no call)", minimum=1),
        Knob("numba_gemm_split", str, "auto", "numba",
             "how several threads share the numba kernels' per-step BLAS products: rows (each its "
             "batch rows through the whole sequence, never waiting, each reading all of W_hh every "
             "step), columns (each a block of W_hh's columns, only its share read, "
             "joined every step), auto (both measured on each kind of call's first use, the "
             "faster kept for the process)",
             choices=("auto", "rows", "columns")),
        Knob("numba_parallel_min_work", int, 200_000, "numba",
             "multiply-adds below which the numba kernels run on one thread", minimum=0),
        Knob("numba_parallel_min_rows", int, 4, "numba",
             "fewest batch rows a numba thread takes", minimum=1),
        Knob("numba_fused_max_work", int, 1 << 19, "numba",
             "multiply-adds up to which a one-layer, one-direction dense numba RNN runs each pass "
             "as one kernel call, doing by hand loops what torch's GEMMs do otherwise: the "
             "forward's input projection (T B I H) and the backward's gradients (T B H (2 I + H), "
             "on one thread); 0 turns it off", minimum=0),
        Knob("numba_cell_gemm_min_work", int, 1 << 18, "numba",
             "multiply-adds of an RNNCell step (B H (I + H)) from which the numba backend runs it "
             "as torch's GEMMs on every core (below it one kernel call, the input projection "
             "included, costs less)", minimum=0),
        Knob("numba_threading_layer", str, "auto", "numba",
             "Numba's threading layer: auto (omp when ATen runs on OpenMP, so one thread pool "
             "serves both), omp, tbb, workqueue, or default (Numba's own choice); applied at the "
             "numba backend's first use unless NUMBA_THREADING_LAYER is set",
             choices=("auto", "omp", "tbb", "workqueue", "default")),
        Knob("numba_blas_threads", int, 1, "numba",
             "threads of SciPy's OpenBLAS, which the numba kernels' per-step np.dot calls; they run "
             "inside numba's own parallel loop, and idle OpenBLAS workers spin and take a core from "
             "whatever runs next. 0 leaves OpenBLAS's default. Applied at the numba backend's "
             "first use if SciPy's BLAS is not loaded yet and OPENBLAS_NUM_THREADS is unset",
             minimum=0),
    )
}

_lock = threading.RLock()
_values: dict[str, Any] = {}
_sources: dict[str, str] = {}  # name -> "default", "environment" or "set"
_sinks: dict[str, list[Callable[[str, Any], None]]] = {}  # owner -> callbacks(name, value)


def _knob(name: str) -> Knob:
    knob = KNOBS.get(name) if isinstance(name, str) else None
    if knob is None:
        raise ValueError(f"unknown knob {name!r}; valid names are: {', '.join(KNOBS)}")
    return knob


def _from_environment() -> None:
    for knob in KNOBS.values():
        raw = os.environ.get(knob.env, "").strip()
        if raw:
            try:
                _values[knob.name] = knob.validate(raw)
            except ValueError as exc:
                raise ValueError(f"{knob.env}: {exc}") from None
            _sources[knob.name] = "environment"
        else:
            _values[knob.name] = knob.default
            _sources[knob.name] = "default"


_from_environment()


def get(name: str) -> Any:
    """The current value of knob ``name``."""
    _knob(name)
    return _values[name]


def set(name: str, value: Any) -> None:  # noqa: A001  (config.set reads as intended)
    """Set knob ``name``; its owner, if already in use, applies it now (and may refuse it)."""
    knob = _knob(name)
    value = knob.validate(value)
    with _lock:
        previous = _values[name], _sources[name]
        _values[name], _sources[name] = value, "set"
        try:
            for sink in _sinks.get(knob.owner, ()):
                sink(name, value)
        except BaseException:
            _values[name], _sources[name] = previous
            for sink in _sinks.get(knob.owner, ()):
                sink(name, previous[0])
            raise


@contextlib.contextmanager
def override(**values: Any) -> Iterator[None]:
    """``with override(cpu_path="gemm"): ...`` sets knobs and restores them on exit."""
    for name in values:
        _knob(name)
    saved = {name: (_values[name], _sources[name]) for name in values}
    try:
        for name, value in values.items():
            set(name, value)
        yield
    finally:
        for name, (value, source) in saved.items():
            if _values[name] != value:
                set(name, value)
            _sources[name] = source


def bind(owner: str, apply: Callable[[str, Any], None], *, now: bool = True) -> None:
    """Called by the code that owns ``owner``'s knobs when it is first used: ``apply(name, value)``
    receives each of those knobs' current value now (unless ``now`` is false), and every later
    :func:`set`."""
    with _lock:
        if now:
            for knob in KNOBS.values():
                if knob.owner == owner:
                    try:
                        apply(knob.name, _values[knob.name])
                    except ValueError as exc:  # say where a value this machine refuses came from
                        where = knob.env if _sources[knob.name] == "environment" else f"config {knob.name!r}"
                        raise ValueError(f"{where}: {exc}") from None
        _sinks.setdefault(owner, []).append(apply)


def describe() -> list[dict[str, Any]]:
    """Every knob with its value, where that value came from, default, type and variable."""
    return [
        {
            "name": k.name,
            "value": _values[k.name],
            "source": _sources[k.name],
            "default": k.default,
            "type": k.type.__name__,
            "env": k.env,
            "owner": k.owner,
            "choices": list(k.choices) if k.choices is not None else None,
            "minimum": k.minimum,
            "help": k.help,
        }
        for k in KNOBS.values()
    ]
