"""What the benchmarks time: one callable per (implementation, shape, pass), all on equal terms.

``torch.nn`` is the baseline: ``torch.nn.RNN`` / ``torch.nn.RNNCell`` with the same weights.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

import myrnn_fast

BASELINE = "torch.nn"

# (T, B, I, H)
ARTICLE = (176, 25, 1, 32)
STREAMING = (512, 1, 64, 64)
SHAPES = [ARTICLE, STREAMING, (100, 64, 256, 256), (100, 64, 512, 512), (100, 64, 1024, 1024)]
PASSES = ("fwd", "fwd+bwd", "cell")

# The reference loop runs Python per row per step: beyond this many row-steps it takes minutes.
REFERENCE_MAX_ROW_STEPS = 5_000


def implementations() -> list[str]:
    return [BASELINE, *myrnn_fast.available_backends()]


def skip_reason(impl: str, shape: tuple[int, int, int, int]) -> str | None:
    T, B, _, _ = shape
    if impl == "reference" and T * B > REFERENCE_MAX_ROW_STEPS:
        return f"reference loop skipped beyond {REFERENCE_MAX_ROW_STEPS} row-steps (T*B = {T * B})"
    return None


def workload(impl: str, shape, pass_: str, dtype=torch.float32, seed: int = 0) -> Callable[[], object]:
    """A zero-argument callable running one pass; inputs and weights are built once, here."""
    T, B, I, H = shape
    torch.manual_seed(seed)
    if pass_ == "cell":
        module = torch.nn.RNNCell(I, H, dtype=dtype)
        if impl != BASELINE:
            ours = myrnn_fast.RNNCell(I, H, dtype=dtype, backend=impl)
            ours.load_state_dict(module.state_dict())
            module = ours
        x, h = torch.randn(B, I, dtype=dtype), torch.randn(B, H, dtype=dtype)

        def cell():
            with torch.no_grad():
                return module(x, h)

        return cell

    module = torch.nn.RNN(I, H, dtype=dtype)
    if impl != BASELINE:
        ours = myrnn_fast.RNN(I, H, dtype=dtype, backend=impl)
        ours.load_state_dict(module.state_dict())
        module = ours
    x = torch.randn(T, B, I, dtype=dtype)
    if pass_ == "fwd":

        def forward():
            with torch.no_grad():
                return module(x)

        return forward

    grad_out, grad_h = torch.randn(T, B, H, dtype=dtype), torch.randn(1, B, H, dtype=dtype)
    params = list(module.parameters())

    def train_step():
        for p in params:
            p.grad = None
        out, h = module(x)
        torch.autograd.backward((out, h), (grad_out, grad_h))

    return train_step


def flops(shape, pass_: str) -> float:
    """Multiply-adds x 2 of the GEMM work (the nonlinearity and bias are not counted)."""
    T, B, I, H = shape
    steps = 1 if pass_ == "cell" else T
    forward = 2 * steps * B * H * (I + H)
    return forward * 3 if pass_ == "fwd+bwd" else forward  # backward: d_input + d_weights
