"""Run a grid of shapes x passes over the baseline and the backends; return the report's data.

Within each (shape, pass) the baseline and every fast backend run interleaved (see ``timing``).
The reference loop is timed on its own, after all the interleaved groups: run in the same rounds,
its allocation churn slows the others (``torch.nn.RNN`` at the article's shape went from 7 ms to
12-23 ms that way), which would flatter every ratio. So are the peers of ``peers.ALONE`` (JAX),
last of all, whose spinning thread pool slowed whatever ran next.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from . import machine, peers as peers_, timing, workloads

REFERENCE = "reference"
FLOOR = "torch.mm floor"  # a pass's products alone, timed in the same rounds (workloads.mm_floor)


@dataclass
class Grid:
    """What to time and for how long: ``budget_s`` seconds of timed rounds per (shape, pass)."""

    shapes: list[tuple[int, int, int, int]]
    passes: list[str] = field(default_factory=lambda: list(workloads.PASSES))
    budget_s: float = 1.0
    min_rounds: int = 5
    max_rounds: int = 200
    reference_budget_s: float = 1.0  # the reference's own block: at least 3 rounds, at most 20
    gemm_sizes: tuple[int, ...] = (256, 512, 1024, 2048)  # square torch.mm sizes for the peak

    @classmethod
    def preset(cls, name: str, **overrides) -> Grid:
        if name not in workloads.PRESETS:
            raise ValueError(f"unknown preset {name!r}; valid presets are: {', '.join(workloads.PRESETS)}")
        settings = {**workloads.PRESETS[name], **{k: v for k, v in overrides.items() if v is not None}}
        return cls(**settings)


def _shape_dict(shape) -> dict:
    return dict(zip("TBIH", (int(v) for v in shape)))


def _row(impl, shape, pass_, measured: timing.Timing, baseline_s: float | None, peak_gflops, how, device, dtype):
    median = measured.median
    gflops = workloads.flops(shape, pass_) / median / 1e9
    return {
        "backend": impl,
        "shape": _shape_dict(shape),
        "pass": pass_,
        **measured.summary(),
        "speedup_vs_torch_nn": baseline_s / median if baseline_s else None,
        "baseline": workloads.baseline(pass_),
        "gflops": gflops,
        "peak_fraction": gflops / peak_gflops if peak_gflops else None,
        "timed": how,
        "peer": False,
        "mm_floor_ms": None,  # rows timed with the floor (interleaved) fill these two
        "fraction_of_floor": None,
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
    }


def _complete(row: dict, peer: peers_.Peer | None, floor_s: float | None) -> dict:
    """A row's peer fields (its check against torch.nn, torch.compile's first call) and its place
    against the torch.mm floor of its group."""
    row["peer"] = peer is not None
    if peer is not None:
        row["error_vs_torch_nn"] = peer.error
        row["compile_s"] = peer.compile_s
    row["mm_floor_ms"] = floor_s * 1e3 if floor_s else None
    row["fraction_of_floor"] = floor_s / (row["median_ms"] / 1e3) if floor_s else None
    return row


def _build_peers(names, shape, pass_, device, dtype, skipped: list, say) -> dict[str, peers_.Peer]:
    """The peers to time at this shape and pass, each checked against torch.nn; the rest go to
    ``skipped`` with the reason (including a failed check, with the error measured)."""
    ready = {}
    for name in names:
        reason = peers_.skip_reason(name, shape, pass_)
        if reason is None:
            try:
                peer = peers_.build(name, shape, pass_, device, dtype)
            except Exception as exc:  # noqa: BLE001  (a peer's own failure is reported, not fatal)
                reason = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            else:
                tolerance = peers_.TOLERANCE.get(dtype, 1e-3)
                if peer.error <= tolerance:
                    ready[name] = peer
                    if peer.compile_s is not None:
                        say(f"  {name} at {workloads.label(shape)} {pass_}: first call (compiling) {peer.compile_s:.1f} s")
                    continue
                reason = (f"disagrees with torch.nn (relative error {peer.error:.2e} > {tolerance:.0e}): "
                          "not timed")
        skipped.append({"backend": name, "shape": _shape_dict(shape), "pass": pass_, "reason": reason})
    return ready


def _progress_line(index: int, total: int, shape, pass_: str, rows: list[dict], started: float) -> str:
    parts = []
    for row in rows:
        part = f"{row['backend']} {timing.format_ms(row['median_ms'])} ms"
        if row["backend"] != row["baseline"]:
            part += f" {row['speedup_vs_torch_nn']:.2f}x"
        parts.append(part)
    return (
        f"[{index:>{len(str(total))}}/{total}] {pass_:<7} {workloads.label(shape):<28} "
        f"{' | '.join(parts)}  ({rows[0]['rounds']} rounds, {time.perf_counter() - started:.0f} s)"
    )


def run(
    grid: Grid,
    backends: list[str] | None = None,
    device="cpu",
    dtype=torch.float32,
    progress: Callable[[str], None] | None = None,
    preset: str | None = None,
    peers: list[str] | None = None,
) -> dict:
    """Time ``grid`` and return ``{"machine", "config", "results", "skipped"}`` (see docs/benchmarks.md).

    ``backends=None`` times every backend usable on ``device``; the others are listed in
    ``skipped`` with the reason, as are the reference loop's shapes that would take too long.
    ``peers`` (names of :mod:`.peers`) are timed in the same rounds after a check against
    ``torch.nn`` (those of ``peers.ALONE`` on their own, last); one not installed, or that
    disagrees, is listed in ``skipped`` with the reason.
    """
    device = torch.device(device)
    say = progress or (lambda message: None)
    started = time.perf_counter()
    chosen, unusable = workloads.select_backends(backends, device)
    skipped = [{"backend": name, "shape": None, "pass": None, "reason": reason} for name, reason in unusable.items()]
    peer_names = []
    for name in dict.fromkeys(peers_.check_name(p) for p in peers or []):
        reason = peers_.unavailable_reason(name, device)
        if reason is None:
            peer_names.append(name)
        else:
            skipped.append({"backend": name, "shape": None, "pass": None, "reason": reason})

    info = machine.machine_info(device)
    say(f"machine: {machine.describe(info)}")
    info["gemm_peak"] = timing.gemm_peak(device, dtype, grid.gemm_sizes)
    peak = info["gemm_peak"]["gflops"]
    say(f"measured {info['gemm_peak']['dtype']} GEMM peak: {peak:.1f} GFLOP/s (n = {info['gemm_peak']['n']})")

    groups = [(tuple(shape), pass_) for shape in grid.shapes for pass_ in grid.passes]
    reference_groups = []
    if REFERENCE in chosen:
        for shape, pass_ in groups:
            reason = workloads.skip_reason(REFERENCE, shape, pass_)
            if reason is None:
                reference_groups.append((shape, pass_))
            else:
                skipped.append({"backend": REFERENCE, "shape": _shape_dict(shape), "pass": pass_, "reason": reason})
    fast = [name for name in chosen if name != REFERENCE]
    twins = [workloads.float32_twin(name) for name in fast] if dtype in workloads.REDUCED_DTYPES else []
    total = len(groups) + len(reference_groups)

    results, baseline_s, floors = [], {}, {}
    together = [name for name in peer_names if name not in peers_.ALONE]
    apart = [name for name in peer_names if name in peers_.ALONE]
    alone = groups if apart else []  # the cell pass too: it lists the peers' reason to skip it
    total += sum(pass_ in peers_.PASSES for _, pass_ in alone)
    for index, (shape, pass_) in enumerate(groups, 1):
        impls = [workloads.baseline(pass_), *fast, *twins]
        fns = {impl: workloads.workload(impl, shape, pass_, device, dtype) for impl in impls}
        checked = _build_peers(together, shape, pass_, device, dtype, skipped, say)
        fns.update({name: peer.fn for name, peer in checked.items()})
        fns[FLOOR] = workloads.mm_floor(shape, device, dtype, pass_)
        timings = timing.interleaved(fns, grid.budget_s, grid.min_rounds, grid.max_rounds)
        del fns
        gc.collect()
        baseline_s[shape, pass_] = timings[impls[0]].median
        floor_s = timings[FLOOR].median if FLOOR in timings else None
        floors[shape, pass_] = floor_s
        rows = [
            _row(impl, shape, pass_, timings[impl], baseline_s[shape, pass_], peak, "interleaved", device,
                 workloads.impl_dtype(impl, dtype)[1])
            for impl in [*impls, *checked]
        ]
        for row in rows:
            _complete(row, checked.get(row["backend"]), floor_s)
        results.extend(rows)
        say(_progress_line(index, total, shape, pass_, rows, started))

    for index, (shape, pass_) in enumerate(reference_groups, len(groups) + 1):
        fn = workloads.workload(REFERENCE, shape, pass_, device, dtype)
        measured = timing.interleaved({REFERENCE: fn}, grid.reference_budget_s, 3, 20, warmup=1)[REFERENCE]
        del fn
        gc.collect()
        row = _row(REFERENCE, shape, pass_, measured, baseline_s[shape, pass_], peak, "alone", device, dtype)
        results.append(row)
        say(_progress_line(index, total, shape, pass_, [row], started))

    # Last, so that their thread pools spin down with nothing else left to time.
    index = len(groups) + len(reference_groups)
    for shape, pass_ in alone:
        checked = _build_peers(apart, shape, pass_, device, dtype, skipped, say)
        rows = []
        for name, peer in checked.items():
            measured = timing.interleaved({name: peer.fn}, grid.budget_s, grid.min_rounds, grid.max_rounds)[name]
            row = _row(name, shape, pass_, measured, baseline_s[shape, pass_], peak, "alone", device, dtype)
            rows.append(_complete(row, peer, floors[shape, pass_]))
        del checked
        gc.collect()
        results.extend(rows)
        if rows:
            index += 1
            say(_progress_line(index, total, shape, pass_, rows, started))

    order = {name: i for i, name in enumerate(["torch.nn.RNN", "torch.nn.RNNCell", *chosen, *twins, *peer_names])}
    position = {group: i for i, group in enumerate(groups)}
    results.sort(key=lambda r: (position[tuple(r["shape"].values()), r["pass"]], order[r["backend"]]))
    info["load_average_after"] = machine.load_average()
    return {
        "machine": info,
        "config": {
            "preset": preset,
            "device": str(device),
            "dtype": str(dtype).removeprefix("torch."),
            "backends": chosen + twins,
            "peers": peer_names,
            "shapes": [_shape_dict(s) for s in grid.shapes],
            "passes": list(grid.passes),
            "budget_s": grid.budget_s,
            "min_rounds": grid.min_rounds,
            "seconds": round(time.perf_counter() - started, 1),
        },
        "results": results,
        "skipped": skipped,
    }
