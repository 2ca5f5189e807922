"""The report: ``report.json`` (every number), ``report.md`` (tables) and ``speedup.png`` (the plot).

``report.md`` holds a section between ``<!-- bench-table:start -->`` and ``<!-- bench-table:end -->``
meant to be pasted into the README as it is.
"""

from __future__ import annotations

import json
from pathlib import Path

from . import machine, workloads
from .timing import format_ms

START, END = "<!-- bench-table:start -->", "<!-- bench-table:end -->"


def _shape(shape: dict) -> tuple[int, ...]:
    return tuple(shape[k] for k in "TBIH")


def _groups(report: dict) -> list[tuple[tuple[int, ...], str]]:
    return [(_shape(s), p) for s in report["config"]["shapes"] for p in report["config"]["passes"]]


def _index(report: dict) -> dict:
    return {(_shape(r["shape"]), r["pass"], r["backend"]): r for r in report["results"]}


def _skip_reason(report: dict, shape, pass_: str, backend: str) -> str | None:
    for entry in report["skipped"]:
        if entry["backend"] == backend and (
            entry["shape"] is None or (_shape(entry["shape"]) == shape and entry["pass"] == pass_)
        ):
            return entry["reason"]
    return None


def provenance(report: dict) -> str:
    config, info = report["config"], report["machine"]
    command = f"`myrnn-fast bench --preset {config['preset']} --device {config['device']}`"
    if not config.get("preset"):
        command = f"`myrnn-fast bench --device {config['device']}` on a custom grid"
    peak = info["gemm_peak"]
    return (
        f"{command} ({config['dtype']}), "
        f"{info['date'][:10]}, on {machine.describe(info)}; measured {peak['dtype']} GEMM peak "
        f"{peak['gflops']:.0f} GFLOP/s" + _load(info) + "."
    )


def _load(info: dict) -> str:
    """The 1-minute load average before the run: above zero, something else was using the CPU."""
    load = info.get("load_average_before")
    return f"; 1-minute load average before the run {load[0]:.2f}" if load else ""


def columns(report: dict) -> list[str]:
    """The implementations with a column of their own: the backends, then the peers."""
    return [*report["config"]["backends"], *report["config"].get("peers", [])]


def _has_floor(report: dict) -> bool:
    """Whether any row was timed beside its pass's torch.mm floor."""
    return any(r.get("mm_floor_ms") for r in report["results"])


def _floor_cell(report: dict, rows: list[dict]) -> str:
    """The torch.mm floor of a group, and the fastest backend's fraction of it."""
    floor = next((r["mm_floor_ms"] for r in rows if r.get("mm_floor_ms")), None)
    if floor is None:
        return "—"
    ours = [r for r in rows if r["backend"] in report["config"]["backends"]]
    if not ours:
        return f"{format_ms(floor)} ms"
    best = min(ours, key=lambda r: r["median_ms"])
    return f"{format_ms(floor)} ms; `{best['backend']}` at **{best['fraction_of_floor']:.2f}**"


def summary_table(report: dict) -> list[str]:
    """One row per (shape, pass): the baseline's median, then each backend's and peer's speedup and
    median, then the torch.mm floor and our best fraction of it."""
    names = columns(report)
    peers = set(report["config"].get("peers", []))
    with_floor = _has_floor(report)
    index = _index(report)
    lines = [
        "| shape (T, B, I, H) | pass | torch.nn | "
        + " | ".join(f"`{b}` (peer)" if b in peers else f"`{b}`" for b in names)
        + (" | torch.mm floor |" if with_floor else " |"),
        "| --- | --- | ---: | " + " | ".join("---:" for _ in names) + (" | ---: |" if with_floor else " |"),
    ]
    for shape, pass_ in _groups(report):
        base = index[shape, pass_, workloads.baseline(pass_)]
        cells, rows = [], [base]
        for backend in names:
            row = index.get((shape, pass_, backend))
            if row is None:
                cells.append("skipped" if _skip_reason(report, shape, pass_, backend) else "—")
            else:
                rows.append(row)
                cells.append(f"**{row['speedup_vs_torch_nn']:.2f}×** {format_ms(row['median_ms'])} ms")
        if with_floor:
            cells.append(_floor_cell(report, rows))
        lines.append(
            f"| {workloads.label(shape)} | {pass_} | {format_ms(base['median_ms'])} ms | " + " | ".join(cells) + " |"
        )
    return lines


def compile_lines(report: dict) -> list[str]:
    """torch.compile's first calls (compiling included), reported apart from the timed calls."""
    rows = [r for r in report["results"] if r.get("compile_s") is not None]
    if not rows:
        return []
    where = "; ".join(f"{workloads.label(_shape(r['shape']))} {r['pass']}: {r['compile_s']:.1f} s" for r in rows)
    return [f"- `{rows[0]['backend']}` first call, compiling included (not in the timed medians; inductor's "
            f"on-disk cache off): {where}"]


def skipped_lines(report: dict) -> list[str]:
    """The skipped backends and, per backend and reason, the shapes (with passes) it was skipped at."""
    merged: dict[tuple[str, str], dict[str, list[str]]] = {}
    for entry in report["skipped"]:
        shapes = merged.setdefault((entry["backend"], entry["reason"]), {})
        if entry["shape"] is None:
            shapes["everywhere"] = []
        else:
            shapes.setdefault(workloads.label(_shape(entry["shape"])), []).append(entry["pass"])
    lines = []
    for (backend, reason), shapes in merged.items():
        where = "; ".join(f"{shape}: {', '.join(passes)}" if passes else shape for shape, passes in shapes.items())
        lines.append(f"- `{backend}` skipped ({where}): {reason}")
    return lines


def busy_warning(report: dict) -> list[str]:
    """A warning when other work held at least half the CPUs as the run began."""
    info = report["machine"]
    load, cpus = info.get("load_average_before"), info.get("logical_cpus") or 1
    if not load or load[0] < cpus / 2:
        return []
    return [f"**Noisy run:** the load average was {load[0]:.2f} on {cpus} logical CPUs before it began: "
            "other work shared the cores, so times are inflated and ratios uncertain; rerun on a quiet machine."]


def pasteable(report: dict) -> str:
    """The section the README carries: provenance, the summary table, what was skipped."""
    lines = [
        START,
        f"Measured with {provenance(report)}",
        *busy_warning(report),
        "Each backend cell: **speedup** = `torch.nn` median / backend median (above 1× is faster than "
        "`torch.nn.RNN`, or `torch.nn.RNNCell` for `cell`), then the backend's median time.",
        *(["Peers (what a user might use instead: same weights and data, checked against `torch.nn` "
           "first, timed in the same rounds, but JAX on its own after the rest, since its spinning "
           "thread pool slows whatever runs next) read the same way."] if report["config"].get("peers") else []),
        *(["**torch.mm floor**: the time `torch.mm` alone takes, in the same rounds, for the products "
           "the pass cannot avoid (fwd: the input projection and T hidden-state products; cell: the same "
           "for one step; fwd+bwd: those, T more hidden-state products, dW_ih, dW_hh and dx); then the "
           "fastest backend's fraction of it (floor / its time: 1 would be all products, no overhead; "
           "above 1, faster than `torch.mm` does them one call at a time)."]
          if _has_floor(report) else []),
        "",
        *summary_table(report),
    ]
    extra = compile_lines(report)
    if extra:
        lines += ["", *extra]
    skipped = skipped_lines(report)
    if skipped:
        lines += ["", *skipped]
    return "\n".join([*lines, END])


def details_table(report: dict) -> list[str]:
    lines = [
        "| shape (T, B, I, H) | pass | implementation | median ms | min ms | IQR ms | rounds × calls "
        "| GFLOP/s | of mm floor | speedup | timed |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for row in report["results"]:
        floor = f"{row['fraction_of_floor']:.2f}" if row.get("fraction_of_floor") else "—"
        name = f"`{row['backend']}`" + (" (peer)" if row.get("peer") else "")
        lines.append(
            f"| {workloads.label(_shape(row['shape']))} | {row['pass']} | {name} | {format_ms(row['median_ms'])} "
            f"| {format_ms(row['min_ms'])} | {format_ms(row['iqr_ms'])} | {row['rounds']} × {row['calls_per_round']} "
            f"| {row['gflops']:.2f} | {floor} | {row['speedup_vs_torch_nn']:.2f}× | {row['timed']} |"
        )
    return lines


def markdown(report: dict, plot_name: str | None) -> str:
    config = report["config"]
    info = report["machine"]
    lines = [
        f"# myrnn_fast benchmark: {config['preset'] or 'custom grid'}, {config['device']}, {config['dtype']}",
        "",
        "The part between the `bench-table` markers is meant to be pasted into the README as it is.",
        "",
        pasteable(report),
        "",
    ]
    if plot_name:
        lines += [f"![speedup against torch.nn by shape]({plot_name})", ""]
    lines += [
        "## Every measurement",
        "",
        "Median, minimum and interquartile range of the per-call time over the rounds; a round times",
        "`calls` consecutive calls of a fast pass and divides. GFLOP/s counts the matrix products only",
        "(forward `2TBH(I+H)`; backward adds the weight gradients and `2TBH(H+I)` for the hidden state",
        "and the input); `of mm floor` (fwd+bwd) is the torch.mm floor's time over this row's.",
        "`interleaved`: timed in the same rounds as the baseline, order rotating per round; `alone`: the",
        "reference loop (its allocation churn) and JAX (its spinning thread pool), timed after the others so",
        "they do not slow them; their speedup is against the baseline's time from the interleaved rounds.",
        "",
        *details_table(report),
        "",
        "## Machine",
        "",
        *(f"- {key}: {value}" for key, value in info.items() if key != "gemm_peak"),
        f"- GEMM peak: {info['gemm_peak']['gflops']:.1f} GFLOP/s ({info['gemm_peak']['dtype']}, "
        f"n = {info['gemm_peak']['n']}, {info['gemm_peak']['device']})",
        "",
        f"Budget {config['budget_s']} s of timed rounds per shape and pass (at least {config['min_rounds']} "
        f"rounds); the whole run took {config['seconds']} s.",
        "",
    ]
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    """Speedup against torch.nn by shape, one series per backend, one panel per pass; log scale."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    passes = report["config"]["passes"]
    shapes = [_shape(s) for s in report["config"]["shapes"]]
    index = _index(report)
    fig = Figure(figsize=(max(6.0, 1.4 * len(shapes)), 1.0 + 2.6 * len(passes)), layout="constrained")
    axes = fig.subplots(len(passes), 1, sharex=True, squeeze=False)[:, 0]
    ticks = ["\n".join(workloads.label(s).split(" (", 1)).rstrip(")") for s in shapes]
    for ax, pass_ in zip(axes, passes):
        ax.axhline(1.0, color="black", linewidth=1, label="torch.nn = 1×")
        peers = report["config"].get("peers", [])
        for backend in columns(report):
            points = [(i, index[s, pass_, backend]["speedup_vs_torch_nn"])
                      for i, s in enumerate(shapes) if (s, pass_, backend) in index]
            if points:
                xs, ys = zip(*points)
                if backend in peers:
                    ax.plot(xs, ys, marker="s", linestyle="--", label=f"{backend} (peer)")
                else:
                    ax.plot(xs, ys, marker="o", label=backend)
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}×"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_xticks(range(len(shapes)), ticks, fontsize=8)
        ax.set_ylabel(f"{pass_}: speedup")
        ax.grid(True, which="both", axis="y", alpha=0.3)
    axes[-1].set_xlabel("shape T, B, I, H")
    axes[0].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    info = report["machine"]
    fig.suptitle(f"speedup against torch.nn (higher is faster), {report['config']['device']} "
                 f"{report['config']['dtype']}: "
                 f"{info['cpu']}, {info['torch_threads']} threads" + (f", {info['gpu']}" if info.get("gpu") else ""),
                 fontsize=9)
    fig.savefig(path, dpi=120)


def write(report: dict, out_dir) -> tuple[list[Path], list[str]]:
    """Write the three files into ``out_dir``; returns the paths written and notes (what was not)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths, notes = [], []
    png = out / "speedup.png"
    try:
        plot(report, png)
        paths.append(png)
    except ImportError:
        notes.append("speedup.png not written: it needs matplotlib (pip install 'myrnn_fast[plot]')")
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    (out / "report.md").write_text(markdown(report, png.name if png in paths else None), encoding="utf-8")
    return [out / "report.md", out / "report.json", *paths], notes
