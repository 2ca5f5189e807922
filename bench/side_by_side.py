"""Ratios against torch.nn, measured side by side: implementations interleaved within every round,
so machine drift hits all of them alike; medians over the rounds.

    python bench/side_by_side.py                       # every shape, pass and available backend
    python bench/side_by_side.py --shapes 176,25,1,32 --passes fwd+bwd --rounds 30
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from workloads import BASELINE, PASSES, SHAPES, flops, implementations, skip_reason, workload


def measure(shape, pass_, impls, rounds: int, warmup: int = 3) -> dict[str, float]:
    fns = {impl: workload(impl, shape, pass_) for impl in impls if not skip_reason(impl, shape)}
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {impl: [] for impl in fns}
    for _ in range(rounds):
        for impl, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[impl].append(time.perf_counter() - start)
    return {impl: statistics.median(ts) for impl, ts in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="*", help="T,B,I,H ...", default=None)
    parser.add_argument("--passes", nargs="*", choices=PASSES, default=list(PASSES))
    parser.add_argument("--backends", nargs="*", default=None)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes] if args.shapes else SHAPES
    impls = [BASELINE, *(args.backends or [i for i in implementations() if i != BASELINE])]

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, "
          f"median of {args.rounds} interleaved rounds")
    print(f"| shape (T, B, I, H) | pass | backend | median ms | GFLOP/s | vs {BASELINE} |")
    print("| --- | --- | --- | ---: | ---: | ---: |")
    for shape in shapes:
        for pass_ in args.passes:
            medians = measure(shape, pass_, impls, args.rounds)
            base = medians[BASELINE]
            for impl, median in medians.items():
                gflops = flops(shape, pass_) / median / 1e9
                print(f"| {shape} | {pass_} | {impl} | {median * 1e3:.3f} | {gflops:.1f} | {base / median:.2f}x |",
                      flush=True)


if __name__ == "__main__":
    main()
