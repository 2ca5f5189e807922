"""What the benchmarks time: one callable per (implementation, shape, pass), all on equal terms.

An implementation is a backend name or the baseline, torch's own module (``torch.nn.RNN`` for the
``fwd`` and ``fwd+bwd`` passes, ``torch.nn.RNNCell`` for ``cell``; cuDNN on CUDA). Every
implementation gets the same weights, inputs and upstream gradients; the callables end with a
CUDA synchronize on CUDA tensors so a wall-clock timer around them measures the GPU work.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .. import registry
from ..modules import RNN, RNNCell

# Shapes are (T, B, I, H): sequence length, batch, input size, hidden size.
ARTICLE = (176, 25, 1, 32)  # the article's noisy sine: sequence 176, batch 25, hidden 32
STREAMING = (512, 1, 64, 64)  # one long stream, one row: latency-bound
FASTRNNS = (100, 64, 512, 512)  # PyTorch's benchmarks/fastrnns default
CUDNN_PERSISTENT = (1406, 34, 120, 120)  # where cuDNN's persistent kernel shines (PyTorch PR 62143)
NAMES = {ARTICLE: "article", STREAMING: "streaming", FASTRNNS: "fastrnns default",
         CUDNN_PERSISTENT: "cuDNN persistent"}

PRESETS = {
    # About a minute on a 2-core machine: small and medium shapes, short time budget per group.
    "quick": {
        "shapes": [ARTICLE, STREAMING, (100, 32, 128, 128)],
        "budget_s": 1.2,
        "min_rounds": 5,
    },
    # Tiny to large: the tiny ones are all fixed cost per call (where a jitted whole program or
    # ONNX Runtime's one C++ call is hardest to beat), then the article's shape, a streaming
    # shape and fastrnns' default.
    "full": {
        "shapes": [
            (1, 1, 1, 8),
            (10, 4, 8, 16),
            (50, 8, 16, 16),
            ARTICLE,
            STREAMING,
            (100, 64, 128, 128),
            (100, 64, 256, 256),
            FASTRNNS,
            (100, 64, 1024, 1024),
        ],
        "budget_s": 4.0,
        "min_rounds": 7,
    },
    # For --device cuda: the shapes the GPU goals are set on, against cuDNN, and the sizes between.
    "gpu": {
        "shapes": [ARTICLE, STREAMING, CUDNN_PERSISTENT, (100, 64, 128, 128), (100, 64, 256, 256), FASTRNNS],
        "budget_s": 2.0,
        "min_rounds": 7,
    },
}

PASSES = ("fwd", "fwd+bwd", "cell")

# In these dtypes a benchmark also times each backend in float32, beside torch.nn and itself in
# the reduced dtype: does the reduced precision pay? Those columns are "<backend> (float32)".
REDUCED_DTYPES = (torch.float16, torch.bfloat16)
_FLOAT32 = " (float32)"


def float32_twin(backend: str) -> str:
    return backend + _FLOAT32


def impl_dtype(impl: str, dtype: torch.dtype) -> tuple[str, torch.dtype]:
    """The backend an implementation name runs and its dtype: float32 for a float32 twin."""
    if impl.endswith(_FLOAT32):
        return impl.removesuffix(_FLOAT32), torch.float32
    return impl, dtype
BASELINES = {"fwd": "torch.nn.RNN", "fwd+bwd": "torch.nn.RNN", "cell": "torch.nn.RNNCell"}

# The reference loop runs Python per row per step: past this many row-steps a call takes seconds.
REFERENCE_MAX_ROW_STEPS = 5_000


def baseline(pass_: str) -> str:
    return BASELINES[pass_]


def label(shape) -> str:
    """``"176, 25, 1, 32 (article)"``: the shape as (T, B, I, H), with its name if it has one."""
    text = ", ".join(str(v) for v in shape)
    name = NAMES.get(tuple(shape))
    return f"{text} ({name})" if name else text


def skip_reason(impl: str, shape, pass_: str) -> str | None:
    """Why ``impl`` is not timed at this shape and pass (``None``: it is)."""
    T, B, _, _ = shape
    row_steps = B if pass_ == "cell" else T * B
    if impl == "reference" and row_steps > REFERENCE_MAX_ROW_STEPS:
        return (
            f"the reference loop is skipped beyond {REFERENCE_MAX_ROW_STEPS} row-steps "
            f"(here {row_steps}): a single call would take seconds"
        )
    return None


def select_backends(requested: list[str] | None, device) -> tuple[list[str], dict[str, str]]:
    """The backends to time on ``device`` and, for the others, why not.

    ``requested=None`` means every backend: those unusable in this install or on this device are
    returned with their reason. A backend named explicitly must be usable in this install
    (``BackendUnavailableError`` otherwise, never a silent drop); one that does not run on this
    device is skipped with the registry's reason.
    """
    device_type = torch.device(device).type
    names = list(registry.BACKENDS) if requested is None else [registry.check_name(n, allow_auto=False) for n in requested]
    run, skipped = [], {}
    for name in dict.fromkeys(names):
        reason = registry.unavailable_reason(name)
        if reason is not None:
            if requested is not None:
                registry.implementation(name)  # raises, saying why and what is available
            skipped[name] = f"not available in this install: {reason}"
            continue
        try:
            registry.resolve_backend(device_type, name)
        except registry.BackendUnavailableError as exc:
            skipped[name] = str(exc)
            continue
        run.append(name)
    return run, skipped


def _synchronizer(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def workload(impl: str, shape, pass_: str, device="cpu", dtype=torch.float32, seed: int = 0) -> Callable[[], object]:
    """A zero-argument callable running one pass of ``impl``; inputs and weights are built here, once.

    ``fwd``: the RNN's forward with autograd off. ``fwd+bwd``: a training step's RNN work, the
    forward and the backward to the input and every parameter (the input needs its gradient, as
    for a layer above another one or an embedding; the default zero ``h0`` needs none). ``cell``: one ``RNNCell`` step with autograd off. "Autograd
    off" is the callable's ``grad_enabled = False``, which the timing applies around whole
    samples (:func:`myrnn_fast.benchmark.timing.grad_mode`).
    """
    if pass_ not in PASSES:
        raise ValueError(f"unknown pass {pass_!r}; valid passes are: {', '.join(PASSES)}")
    impl, dtype = impl_dtype(impl, dtype)
    T, B, I, H = shape
    device = torch.device(device)
    sync = _synchronizer(device)
    module, x, grad_out, grad_h = problem(shape, pass_, device, dtype, seed)
    if impl != baseline(pass_):
        ours = (RNNCell if pass_ == "cell" else RNN)(I, H, device=device, dtype=dtype, backend=impl)
        ours.load_state_dict(module.state_dict())
        module = ours

    if pass_ == "cell":
        h = grad_out

        def cell():  # timed with autograd off (see timing._sample), as the forward pass
            result = module(x, h)
            sync()
            return result

        cell.grad_enabled = False
        return cell

    if pass_ == "fwd":

        def forward():
            result = module(x)
            sync()
            return result

        forward.grad_enabled = False
        return forward

    params = list(module.parameters())

    def train_step():
        for p in params:
            p.grad = None
        x.grad = None
        out, h_n = module(x)
        torch.autograd.backward((out, h_n), (grad_out, grad_h))
        sync()

    return train_step


def problem(shape, pass_: str, device="cpu", dtype=torch.float32, seed: int = 0):
    """The baseline's module and the data every implementation of this pass gets:
    ``(torch_module, x, grad_out, grad_h)``. For ``cell``, x is one step's ``[B, I]``, ``grad_out``
    the state ``h`` ``[B, H]`` and ``grad_h`` ``None``; otherwise x is ``[T, B, I]`` (requiring
    its gradient for ``fwd+bwd``) and the two upstream gradients are those of the output and of
    ``h_n``."""
    T, B, I, H = shape
    device = torch.device(device)
    generator = torch.Generator().manual_seed(seed)

    def randn(*size):  # drawn on the CPU so every device sees the same numbers
        return torch.randn(*size, generator=generator, dtype=dtype).to(device)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = (torch.nn.RNNCell if pass_ == "cell" else torch.nn.RNN)(I, H, device=device, dtype=dtype)
    if pass_ == "cell":
        return module, randn(B, I), randn(B, H), None
    return module, randn(T, B, I).requires_grad_(pass_ == "fwd+bwd"), randn(T, B, H), randn(1, B, H)


def mm_floor(shape, device="cpu", dtype=torch.float32, pass_: str = "fwd+bwd") -> Callable[[], None]:
    """The matrix products a pass cannot avoid, each one ``torch.mm`` into a preallocated output.
    ``fwd``: the input projection of every step and one hidden-state product per step; ``cell``:
    the same for one step. ``fwd+bwd`` adds one hidden-state product per step backward, the
    weight gradients ``dW_ih`` and ``dW_hh``, and the input's gradient ``dx`` (the pass needs it,
    see :func:`workload`). The nonlinearity, the biases and the per-step bookkeeping are not
    among them. Its time is the floor an implementation's pass is measured against."""
    T, B, I, H = shape
    if pass_ == "cell":
        T = 1
    device = torch.device(device)
    sync = _synchronizer(device)
    N = T * B

    def randn(*size):
        return torch.randn(*size, dtype=dtype, device=device)

    x, w_ih, w_hh, y, dz = randn(N, I), randn(H, I), randn(H, H), randn(N, H), randn(N, H)
    projected, dw_ih, dw_hh, dx = randn(N, H), randn(H, I), randn(H, H), randn(N, I)
    steps = [randn(B, H) for _ in range(2)]

    backward = pass_ == "fwd+bwd"

    def floor():
        torch.mm(x, w_ih.t(), out=projected)
        for _ in range(T):
            torch.mm(steps[0], w_hh.t(), out=steps[1])  # forward: h_t = f(p_t + h_{t-1} W_hh^T)
        if not backward:
            sync()
            return
        for _ in range(T):
            torch.mm(steps[1], w_hh, out=steps[0])  # backward: dz_t W_hh
        torch.mm(dz.t(), x, out=dw_ih)
        torch.mm(dz.t(), y, out=dw_hh)
        torch.mm(dz, w_ih, out=dx)
        sync()

    return floor


def flops(shape, pass_: str) -> float:
    """Floating-point operations of the matrix products a pass needs (2 per multiply-add).

    Forward: ``2 T B H (I + H)``. Backward adds the weight gradients (the same count again), the
    hidden-state gradient through ``W_hh`` (``2 T B H H``) and the input's (``2 T B H I``). The
    nonlinearity and the biases are not counted. A cell pass is one step (``T = 1``).
    """
    T, B, I, H = shape
    steps = 1 if pass_ == "cell" else T
    forward = 2 * steps * B * H * (I + H)
    if pass_ == "fwd+bwd":
        return 2 * forward + 2 * steps * B * H * (H + I)
    return forward
