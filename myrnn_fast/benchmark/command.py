"""``myrnn-fast bench``: arguments and the command itself (``myrnn_fast.cli`` registers it)."""

from __future__ import annotations

import argparse
import sys

import torch

from .. import registry
from . import report as report_
from . import peers as peers_
from . import runner, workloads

DTYPES = ("float32", "float64", "bfloat16", "float16")


def _backend_list(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError("name at least one backend")
    for name in names:
        try:
            registry.check_name(name, allow_auto=False)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return names


def _peer_list(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError("name at least one peer")
    try:
        return [peers_.check_name(name) for name in names]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _pass_list(text: str) -> list[str]:
    passes = [p.strip() for p in text.split(",") if p.strip()]
    bad = [p for p in passes if p not in workloads.PASSES]
    if bad or not passes:
        raise argparse.ArgumentTypeError(f"unknown pass {', '.join(bad) or text!r}; valid passes are: {', '.join(workloads.PASSES)}")
    return passes


def _shape(text: str) -> tuple[int, int, int, int]:
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 4 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"a shape is four positive integers T,B,I,H (got {text!r})")
    return shape


def _seconds(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError("must be a positive number of seconds")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", choices=list(workloads.PRESETS), default="quick",
                        help="quick: small and medium shapes, about a minute; full: small to large, several minutes; "
                             "gpu: the shapes of the GPU goals (use with --device cuda)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where the tensors live (cuda: the baseline is cuDNN's RNN)")
    parser.add_argument("--backends", type=_backend_list, metavar="A,B",
                        help=f"backends to time, comma-separated (default: every one usable on the device; "
                             f"names: {', '.join(registry.BACKENDS)})")
    parser.add_argument("--peers", type=_peer_list, metavar="A,B",
                        help=f"also time what a user might use instead, checked against torch.nn first: "
                             f"{', '.join(peers_.PEERS)} (or {', '.join(peers_.ALIASES)}); needs "
                             f"pip install 'myrnn_fast[peers]', a peer not installed is skipped with the reason")
    parser.add_argument("--dtype", choices=DTYPES, default="float32",
                        help="bfloat16 / float16 also time each backend in float32 (columns '<backend> (float32)'): "
                             "what the reduced precision gains")
    parser.add_argument("--out", metavar="DIR", help="write report.md, report.json and speedup.png here")
    parser.add_argument("--shapes", type=_shape, nargs="+", metavar="T,B,I,H", help="replace the preset's shapes")
    parser.add_argument("--passes", type=_pass_list, metavar="P,Q",
                        help=f"passes to time, comma-separated (default: {','.join(workloads.PASSES)})")
    parser.add_argument("--budget", type=_seconds, metavar="SECONDS",
                        help="seconds of timed rounds per shape and pass (default: the preset's)")


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(args: argparse.Namespace) -> int:
    if args.device == "cuda" and not torch.cuda.is_available():
        print("myrnn-fast bench: --device cuda, but torch sees no CUDA device here "
              f"(torch {torch.__version__}, built with CUDA {torch.version.cuda})", file=sys.stderr)
        return 2
    grid = runner.Grid.preset(args.preset, shapes=args.shapes, passes=args.passes, budget_s=args.budget)
    result = runner.run(grid, args.backends, args.device, getattr(torch, args.dtype), _progress,
                        preset=None if args.shapes else args.preset, peers=args.peers)
    print("\n".join(report_.summary_table(result)))
    skipped = report_.skipped_lines(result)
    if skipped:
        print("\n".join(["", *skipped]))
    if args.out is None:
        print("\n(no files written: --out DIR writes report.md, report.json and speedup.png)")
        return 0
    paths, notes = report_.write(result, args.out)
    print()
    for path in paths:
        print(f"wrote {path}")
    for note in notes:
        print(note, file=sys.stderr)
    return 0
