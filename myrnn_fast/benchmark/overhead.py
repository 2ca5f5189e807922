"""Fixed costs per call of the ``cpp`` backend, against its own kernels and PyTorch's autograd.

    python -m myrnn_fast.benchmark.overhead [--shapes T,B,I,H ...] [--budget SECONDS]

For one layer (float32, tanh, on the CPU) it times, interleaved in the same rounds (medians):

- ``kernel fwd``: ``_C.rnn_forward_cpu`` alone, the forward kernel without module, dispatcher
  or autograd; ``module fwd``: ``myrnn_fast.RNN`` under ``no_grad``. Their difference is what a
  forward costs above its kernel (issue 13 asks for at most 10 us);
- ``kernels fwd+bwd``: the forward and backward kernels called back to back; ``module fwd+bwd``:
  a training step as ``myrnn-fast bench`` times it (input, h0-free, every weight's gradient);
- ``autograd floor``: the same training step through a do-nothing C++ autograd node with the
  same inputs and outputs (``_C.autograd_floor``: empty results, no arithmetic): what PyTorch's
  eager autograd itself costs for that call (graph, engine, gradient accumulation), which no
  extension can avoid; ``Function floor``: the same through a do-nothing Python
  ``autograd.Function``, which is what a Python-side autograd would add;
- ``torch.nn fwd+bwd``: the baseline.

The training step's own overhead is ``module fwd+bwd - kernels fwd+bwd``; the part of it that
is PyTorch's is the autograd floor.
"""

from __future__ import annotations

import argparse

import torch

from . import timing

SHAPES = [(1, 1, 1, 8), (10, 4, 8, 16), (176, 25, 1, 32), (512, 1, 64, 64)]


class _Nothing(torch.autograd.Function):
    """An RNN layer's inputs and outputs, and no work: eager autograd's own cost for such a call."""

    @staticmethod
    def forward(ctx, x, w_ih, w_hh, b_ih, b_hh):
        ctx.shapes = [t.shape for t in (x, w_ih, w_hh, b_ih, b_hh)]
        T, B, _ = x.shape
        return x.new_empty(T, B, w_hh.shape[0]), x.new_empty(1, B, w_hh.shape[0])

    @staticmethod
    def backward(ctx, grad_out, grad_h):
        return tuple(grad_out.new_empty(s) for s in ctx.shapes)


def callables(shape) -> dict:
    from .. import RNN, _C

    T, B, I, H = shape
    torch.manual_seed(0)
    ref = torch.nn.RNN(I, H)
    ours = RNN(I, H, backend="cpp")
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(T, B, I, requires_grad=True)
    h0 = torch.zeros(B, H)
    grad_out, grad_h = torch.randn(T, B, H), torch.randn(1, B, H)
    weights = [p.detach() for p in ours.parameters()]

    def kernel_fwd():
        return _C.rnn_forward_cpu(x, h0, *weights, None, "tanh")

    kernel_fwd.grad_enabled = False

    def module_fwd():
        return ours(x)

    module_fwd.grad_enabled = False

    def kernels_fwd_bwd():
        out, _ = _C.rnn_forward_cpu(x, h0, *weights, None, "tanh")
        return _C.rnn_backward_cpu(grad_out, grad_h[0], x, h0, weights[0], weights[1], out, None, "tanh", True)

    kernels_fwd_bwd.grad_enabled = False

    def step(module, run):
        params = list(module.parameters())

        def train_step():
            for p in params:
                p.grad = None
            x.grad = None
            out, h_n = run()
            torch.autograd.backward((out, h_n), (grad_out, grad_h))

        return train_step

    return {
        "kernel fwd": kernel_fwd,
        "module fwd": module_fwd,
        "kernels fwd+bwd": kernels_fwd_bwd,
        "module fwd+bwd": step(ours, lambda: ours(x)),
        "autograd floor": step(ref, lambda: _C.autograd_floor(x, list(ref.parameters()), H)),
        "Function floor": step(ref, lambda: _Nothing.apply(x, *ref.parameters())),
        "torch.nn fwd+bwd": step(ref, lambda: ref(x)),
    }


def measure(shapes=SHAPES, budget_s: float = 2.0) -> list[dict]:
    rows = []
    for shape in shapes:
        medians = {name: t.median * 1e6 for name, t in timing.interleaved(callables(shape), budget_s, 15).items()}
        medians["fwd overhead"] = medians["module fwd"] - medians["kernel fwd"]
        medians["fwd+bwd overhead"] = medians["module fwd+bwd"] - medians["kernels fwd+bwd"]
        rows.append({"shape": shape, "us": medians})
    return rows


def table(rows: list[dict]) -> str:
    columns = ["kernel fwd", "module fwd", "fwd overhead", "kernels fwd+bwd", "module fwd+bwd",
               "fwd+bwd overhead", "autograd floor", "Function floor", "torch.nn fwd+bwd"]
    lines = ["| T, B, I, H | " + " | ".join(f"{c} (us)" for c in columns) + " |",
             "| --- | " + " | ".join("---:" for _ in columns) + " |"]
    for row in rows:
        cells = " | ".join(f"{row['us'][c]:.1f}" for c in columns)
        lines.append(f"| {', '.join(map(str, row['shape']))} | {cells} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", help="T,B,I,H each (default: %(default)s)",
                        default=[",".join(map(str, s)) for s in SHAPES])
    parser.add_argument("--budget", type=float, default=2.0, help="seconds of rounds per shape")
    args = parser.parse_args(argv)
    shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; medians of interleaved rounds, microseconds")
    print(table(measure(shapes, args.budget)))


if __name__ == "__main__":
    main()
