"""Peak memory of one training step, by dtype: what reduced precision saves (issue 15).

    python -m myrnn_fast.benchmark.memory [--shape T,B,I,H] [--backends cpp,torch.nn] [--dtypes ...]

Each (implementation, dtype) runs in a fresh process, so one run's freed memory cannot serve the
next. That process builds the layer (tanh, CPU), the input (needing its gradient) and the
output's gradient, reads its resident memory, restarts the kernel's high-water mark (Linux's
``/proc/self/clear_refs``; elsewhere the peak so far, ``ru_maxrss``, stands in), runs one forward
and backward and reads the high-water mark. The difference is the step's peak above its inputs:
the saved activations, the backward's scratch, the gradients, any copy in another dtype the
implementation makes, and one-time buffers (a BLAS's workspace), as a user's first training step
sees them.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

SHAPE = (2000, 64, 64, 256)

_CHILD = r"""
import json, resource, sys, torch
impl, dtype_name, T, B, I, H = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:7])
dtype = getattr(torch, dtype_name)
torch.manual_seed(0)
if impl == "torch.nn":
    rnn = torch.nn.RNN(I, H, dtype=dtype)
else:
    import myrnn_fast
    rnn = myrnn_fast.RNN(I, H, dtype=dtype, backend=impl)
x = torch.randn(T, B, I, dtype=dtype).requires_grad_(True)
grad_out = torch.randn(T, B, H, dtype=dtype)

def status_kb(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))

try:  # Linux: the high-water mark restarts from the current size (clear_refs 5)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status_kb("VmRSS")
except OSError:  # elsewhere, the process's peak so far
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out, _ = rnn(x)
out.backward(grad_out)
try:
    after = status_kb("VmHWM")
except OSError:
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"step_mb": (after - before) / 1024}))
"""


def step_peak(impl: str, dtype: str, shape=SHAPE) -> float:
    """MB of peak resident memory one training step adds, in a fresh process."""
    done = subprocess.run([sys.executable, "-c", _CHILD, impl, dtype, *map(str, shape)], capture_output=True,
                          text=True, timeout=1800)
    if done.returncode:
        raise RuntimeError(f"{impl} {dtype}: {done.stderr.strip() or done.returncode}")
    return json.loads(done.stdout)["step_mb"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default=",".join(map(str, SHAPE)), help="T,B,I,H (default: %(default)s)")
    parser.add_argument("--backends", default="cpp,torch.nn", help="comma-separated (default: %(default)s)")
    parser.add_argument("--dtypes", default="float32,bfloat16,float16", help="comma-separated (default: %(default)s)")
    args = parser.parse_args(argv)
    shape = tuple(int(v) for v in args.shape.split(","))
    dtypes = args.dtypes.split(",")
    print(f"training step peak memory above the inputs (MB), one fresh process each, shape {shape}")
    ratio_names = [f"{d} / {dtypes[0]}" for d in dtypes[1:]]
    print("| implementation | " + " | ".join(dtypes + ratio_names) + " |")
    print("| --- |" + " ---: |" * (2 * len(dtypes) - 1))
    for impl in args.backends.split(","):
        peaks = {d: step_peak(impl, d, shape) for d in dtypes}
        ratios = [f"{peaks[d] / peaks[dtypes[0]]:.2f}" for d in dtypes[1:]]
        print(f"| {impl} | " + " | ".join([f"{peaks[d]:.0f}" for d in dtypes] + ratios) + " |")


if __name__ == "__main__":
    main()
