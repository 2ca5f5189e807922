"""Command line: ``myrnn-fast`` / ``python -m myrnn_fast`` with ``info``, ``demo`` and ``bench``."""

from __future__ import annotations

import argparse
import json
import platform
import sys
from importlib import metadata

import torch

from . import __version__, autotune, config, registry


def extension_info() -> dict:
    """How ``myrnn_fast._C`` was built, or why it cannot be loaded."""
    try:
        from . import _C  # importing it registers the torch.ops.myrnn_fast ops
    except ImportError as exc:
        return {"built": False, "error": str(exc)}
    return {"built": True, **json.loads(_C.build_info())}


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def collect_info() -> dict:
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    resolved = {}
    for device in devices:
        try:
            resolved[device] = registry.resolve_backend(device)
        except registry.BackendUnavailableError as exc:
            resolved[device] = f"error: {exc}"
    return {
        "myrnn_fast": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "numpy": _version("numpy"),
        "numba": _version("numba"),
        "scipy": _version("scipy"),
        "torch_threads": torch.get_num_threads(),
        "extension": extension_info(),
        "backends": {name: registry.unavailable_reason(name) for name in registry.BACKENDS},
        "default_backend": registry.get_backend(),
        "resolved": resolved,
        "numba_kernels": numba_kernels_info(),
        "config": config.describe(),
        "autotune": autotune.choices(),
        "numba_splits": [] if registry.unavailable_reason("numba") else registry.implementation("numba").split_choices(),
    }


def numba_kernels_info() -> dict | None:
    """Load (or, with a cold disk cache, compile) the numba backend's kernels and time it."""
    if registry.unavailable_reason("numba") is not None:
        return None
    return registry.implementation("numba").warm_up()


def _print_info(info: dict) -> None:
    print(f"myrnn_fast {info['myrnn_fast']}")
    print(f"  python {info['python']} on {info['platform']}")
    cuda = f", CUDA {info['torch_cuda']}" if info["torch_cuda"] else ", CPU build"
    print(f"  torch {info['torch']}{cuda}; {info['torch_threads']} threads; GPU available: {info['cuda_available']}")
    for package in ("numpy", "numba", "scipy"):
        print(f"  {package} {info[package] or 'not installed'}")
    ext = info["extension"]
    print("extension myrnn_fast._C")
    if ext["built"]:
        print(f"  compiler {ext['compiler']} (C++ {ext['cplusplus']}, {ext['build_type']})")
        print(f"  built against torch {ext['torch']} (C++11 ABI: {ext['cxx11_abi']}); CUDA: {ext['cuda']}")
        print(f"  thread pool: ATen {ext['parallel_backend']}, {ext['num_threads']} threads")
        print(f"  CPU kernels: {ext['cpu_isa']} (knob cpu_isa)")
        if ext.get("cpu_conversions"):
            print(f"  float16 / bfloat16 in those kernels: {ext['cpu_conversions']}")
        if ext["torch"] != torch.__version__.split("+")[0]:
            print(f"  WARNING: running under torch {torch.__version__}; rebuild with --no-build-isolation")
    else:
        print(f"  not loadable: {ext['error']}")
    print("backends")
    for name, reason in info["backends"].items():
        print(f"  {name:<10} {'available' if reason is None else 'unavailable: ' + reason}")
    kernels = info["numba_kernels"]
    if kernels is not None:
        source = "from the disk cache" if not kernels["cache_misses"] else "compiled (cache was cold)"
        print(f"  numba kernels {source} in {kernels['seconds']:.2f} s; cache {kernels['cache_dir']}; "
              f"threading layer {kernels['threading_layer']}, {kernels['threads']} threads")
    print(f"default: {info['default_backend']} (MYRNN_BACKEND)")
    for device, name in info["resolved"].items():
        print(f"  {device} tensors run on: {name}")
    print("cpp CPU paths chosen by measurement (knob cpu_autotune; in this process, or loaded from "
          "cpu_autotune_file)")
    if not info["autotune"]:
        print("  none yet: each kind of call is measured when first run")
    for c in info["autotune"]:
        times = ", ".join(f"{path} {ms:.3f} ms" for path, ms in c["times_ms"].items())
        layer = f"H={c['hidden']}" + (f" I={c['input']}" if c["input"] else "")
        print(f"  {c['pass']:<8} {layer} B<={c['batch_max']} T<={c['steps_max']} {c['dtype']} {c['threads']} threads "
              f"{c['isa']}: {c['path']} ({times or 'loaded'})")
    print("numba per-step product splits chosen by measurement (knob numba_gemm_split; in this process)")
    if not info["numba_splits"]:
        print("  none yet: each kind of call is measured when first run")
    for c in info["numba_splits"]:
        times = ", ".join(f"{split} {ms:.3f} ms" for split, ms in c["times_ms"].items())
        print(f"  {c['pass']:<8} H={c['hidden']} B<={c['batch_max']} T<={c['steps_max']} {c['dtype']} "
              f"{c['threads']} threads: {c['split']} ({times})")
    print("configuration (myrnn_fast.config; each knob's variable sets it at import)")
    for knob in info["config"]:
        origin = "" if knob["source"] == "default" else f", from {knob['source']}; default {knob['default']}"
        print(f"  {knob['name']:<30} {knob['value']!s:<8} {knob['env']}{origin}")


def _cmd_info(args) -> int:
    info = collect_info()
    if args.json:
        print(json.dumps(info))
    else:
        _print_info(info)
    return 0


def _cmd_demo(args) -> int:
    from . import demo

    def progress(epoch, epochs, loss, seconds):
        print(f"epoch {epoch:>4}/{epochs}  loss {loss:.6f}  {seconds * 1e3:7.2f} ms", flush=True)

    result = demo.run(args.backend, args.epochs, args.seed, progress=None if args.json else progress)
    if args.out is not None:
        try:
            paths = demo.plot(result, args.out)
        except ImportError:
            print("--out needs matplotlib: pip install 'myrnn_fast[plot]'", file=sys.stderr)
            return 1
        if not args.json:
            for path in paths:
                print(f"wrote {path}")
    if args.json:
        print(json.dumps(result.summary()))
    else:
        print(
            f"backend {result.backend}: final MSE {result.final_loss:.6f} after {result.epochs} epochs, "
            f"{result.seconds_per_epoch * 1e3:.2f} ms per epoch"
        )
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="myrnn-fast", description=__doc__)
    parser.add_argument("--version", action="version", version=f"myrnn_fast {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    info = commands.add_parser("info", help="versions, how the extension was built, which backends run here")
    info.add_argument("--json", action="store_true", help="print one JSON object")
    info.set_defaults(func=_cmd_info)

    from .demo import BASELINE, EPOCHS

    demo = commands.add_parser("demo", help="the article's noisy-sine experiment")
    demo.add_argument(
        "--backend",
        default=registry.get_backend(),
        choices=[registry.AUTO, *registry.BACKENDS, BASELINE],
        help=f"which backend trains ({BASELINE!r} is torch's own nn.RNN, for comparison)",
    )
    demo.add_argument("--epochs", type=_positive_int, default=EPOCHS)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--out", metavar="DIR", help="write loss.png and prediction.png here")
    demo.add_argument("--json", action="store_true", help="no progress; last line is a JSON summary")
    demo.set_defaults(func=_cmd_demo)

    from .benchmark import command as bench_command

    bench = commands.add_parser("bench", help="time every backend against torch.nn.RNN; write the report")
    bench_command.add_arguments(bench)
    bench.set_defaults(func=bench_command.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except registry.BackendUnavailableError as exc:
        print(f"myrnn-fast: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
