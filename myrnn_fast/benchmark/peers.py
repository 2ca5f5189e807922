"""Peers: what a user choosing a fast RNN would try instead, timed beside the backends.

- ``jax``: ``jax.lax.scan`` of the Elman step under ``jax.jit`` (the input projection of every step
  hoisted out of the scan, as one matrix product); training is ``jax.jit(jax.grad(...))``
  with respect to the weights and the input;
- ``onnxruntime``: ONNX's ``RNN`` operator in an ONNX Runtime CPU session (forward only: ONNX
  Runtime does not train it);
- ``torch.compile``: inductor over the Elman loop written in plain torch, one product and one
  ``tanh`` a step, unrolled into one graph; its compile time is reported on its own.

Each peer gets the weights, inputs and upstream gradients of the ``torch.nn`` baseline, and its
results are compared with ``torch.nn``'s before it is timed; one that disagrees is reported, not
timed. The packages are imported only when a peer is asked for (``pip install 'myrnn_fast[peers]'``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import workloads

PEERS = ("jax", "onnxruntime", "torch.compile")
ALIASES = {"compile": "torch.compile", "ort": "onnxruntime"}
_PACKAGES = {"jax": ("jax", "jaxlib"), "onnxruntime": ("onnx", "onnxruntime"), "torch.compile": ()}
PASSES = ("fwd", "fwd+bwd")  # peers run whole sequences; RNNCell has no peer here
# Timed on their own after the interleaved groups, as the reference loop is: XLA's CPU thread
# pool keeps its workers spinning for a while after every call, and interleaved with it a
# torch.nn.RNNCell step measured 31 us instead of 20 (every column timed after JAX inflated). Their
# ratio is against torch.nn's time from the interleaved group of the same shape and pass.
ALONE = frozenset({"jax"})

# Normwise relative error (||peer - torch.nn|| / ||torch.nn||, the worst over the compared
# tensors) above which a peer's results are taken as wrong: orders of magnitude above the rounding
# of a different summation order, far below any real error.
TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-9}

# torch.compile unrolls the loop into a graph of T steps and compiles all of them: compiling takes
# about a minute at T = 176 on 2 cores, and grows with T; longer sequences are skipped.
COMPILE_MAX_STEPS = 256


def check_name(name: str) -> str:
    """The peer's canonical name; ``ValueError`` listing the valid ones for an unknown name."""
    canonical = ALIASES.get(name, name)
    if canonical not in PEERS:
        raise ValueError(f"unknown peer {name!r}; valid peers are: {', '.join(PEERS)} (or {', '.join(ALIASES)})")
    return canonical


def unavailable_reason(peer: str, device) -> str | None:
    """Why ``peer`` cannot run here (``None``: it can)."""
    missing = [p for p in _PACKAGES[peer] if importlib.util.find_spec(p) is None]
    if missing:
        return f"{' and '.join(missing)} not installed (pip install 'myrnn_fast[peers]')"
    if torch.device(device).type != "cpu" and peer != "torch.compile":
        return f"timed on the CPU only (the {peer} peer here does not run on {torch.device(device).type})"
    return None


def skip_reason(peer: str, shape, pass_: str) -> str | None:
    """Why ``peer`` is not timed at this shape and pass (``None``: it is)."""
    if pass_ not in PASSES:
        return "peers run whole sequences: no RNNCell pass"
    if peer == "onnxruntime" and pass_ == "fwd+bwd":
        return "forward only: ONNX Runtime runs the RNN operator for inference"
    if peer == "torch.compile" and shape[0] > COMPILE_MAX_STEPS:
        return (f"the loop unrolls into a graph of T = {shape[0]} steps; compiling beyond "
                f"{COMPILE_MAX_STEPS} takes minutes")
    return None


@dataclass
class Peer:
    """A peer ready to time: ``fn`` runs one pass; ``error`` is its check against torch.nn."""

    fn: Callable[[], object]
    error: float  # normwise relative error against torch.nn (see TOLERANCE)
    compile_s: float | None = None  # torch.compile: seconds of the first call, compiling included


def _cold_compile(peer: str):
    """torch.compile's first call as on a model it has not seen: without inductor's on-disk cache
    of compiled graphs, which a previous run at the same shape would have filled (a warm cache
    cuts the compile time to a fraction)."""
    if peer != "torch.compile":
        return contextlib.nullcontext()
    import torch._inductor.config

    return torch._inductor.config.patch(fx_graph_cache=False)


def _relative_error(got, expected) -> float:
    worst = 0.0
    for g, e in zip(got, expected, strict=True):
        g = torch.as_tensor(g).to(e.dtype).reshape(e.shape)
        scale = max(torch.linalg.vector_norm(e).item(), torch.finfo(e.dtype).tiny)
        worst = max(worst, torch.linalg.vector_norm(g - e).item() / scale)
    return worst


def build(peer: str, shape, pass_: str, device="cpu", dtype=torch.float32, seed: int = 0) -> Peer:
    """``peer``'s callable for one pass, on the baseline's weights and data, checked against it."""
    module, x, grad_out, grad_h = workloads.problem(shape, pass_, device, dtype, seed)
    weights = [p.detach() for p in (module.weight_ih_l0, module.weight_hh_l0, module.bias_ih_l0, module.bias_hh_l0)]
    if pass_ == "fwd":
        with torch.no_grad():
            expected = list(module(x))
    else:
        out, h_n = module(x)
        torch.autograd.backward((out, h_n), (grad_out, grad_h))
        expected = [p.grad for p in (module.weight_ih_l0, module.weight_hh_l0, module.bias_ih_l0, module.bias_hh_l0)]
        expected.append(x.grad)
        x.grad = None
    make = {"jax": _jax, "onnxruntime": _onnxruntime, "torch.compile": _compile}[peer]
    fn, first = make(shape, pass_, weights, x, grad_out, grad_h)
    started = time.perf_counter()
    with _cold_compile(peer):
        got = first()  # jax.jit and torch.compile compile here
    first_s = time.perf_counter() - started
    return Peer(fn, _relative_error(got, expected), first_s if peer == "torch.compile" else None)


def _jax(shape, pass_, weights, x, grad_out, grad_h):
    import jax
    import jax.numpy as jnp

    if x.dtype == torch.float64:
        jax.config.update("jax_enable_x64", True)

    def array(t):
        return jnp.asarray(t.detach().cpu().numpy())

    params, xs = tuple(array(w) for w in weights), array(x)
    h0 = jnp.zeros((shape[1], shape[3]), dtype=xs.dtype)

    def elman(params, xs):
        w_ih, w_hh, b_ih, b_hh = params
        projected = xs @ w_ih.T + b_ih + b_hh

        def step(h, p):
            h = jnp.tanh(p + h @ w_hh.T)
            return h, h

        h_n, out = jax.lax.scan(step, h0, projected)
        return out, h_n

    if pass_ == "fwd":
        forward = jax.jit(elman)

        def fn():
            return jax.block_until_ready(forward(params, xs))

        return fn, lambda: fn()

    go, gh = array(grad_out), array(grad_h[0])

    def loss(params, xs):
        out, h_n = elman(params, xs)
        return jnp.vdot(out, go) + jnp.vdot(h_n, gh)

    grads = jax.jit(jax.grad(loss, argnums=(0, 1)))  # the weights' and the input's

    def train_step():
        return jax.block_until_ready(grads(params, xs))

    def first():
        grad_params, grad_xs = train_step()
        return [*grad_params, grad_xs]

    return train_step, first


def _onnxruntime(shape, pass_, weights, x, grad_out, grad_h):
    import numpy as np
    import onnxruntime
    from onnx import TensorProto, helper, numpy_helper

    T, B, I, H = shape
    w_ih, w_hh, b_ih, b_hh = (w.cpu().numpy() for w in weights)
    element = TensorProto.DOUBLE if x.dtype == torch.float64 else TensorProto.FLOAT
    initializers = [
        numpy_helper.from_array(w_ih[None], "W"),
        numpy_helper.from_array(w_hh[None], "R"),
        numpy_helper.from_array(np.concatenate([b_ih, b_hh])[None], "B"),
    ]
    node = helper.make_node("RNN", ["X", "W", "R", "B"], ["Y", "Y_h"], hidden_size=H, activations=["Tanh"])
    graph = helper.make_graph(
        [node], "elman", [helper.make_tensor_value_info("X", element, [T, B, I])],
        [helper.make_tensor_value_info("Y", element, [T, 1, B, H]),
         helper.make_tensor_value_info("Y_h", element, [1, B, H])],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    model.ir_version = 8  # readable by every ONNX Runtime that runs opset 14
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()  # the cores torch and our backends use
    options.inter_op_num_threads = 1
    # Its workers would otherwise spin after each call and hold the cores the next implementation
    # timed needs: measured here, a cpp forward right after an ONNX Runtime call took 4 ms
    # instead of 0.1. Spinning only helps a process that runs nothing else between calls.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = onnxruntime.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    feed = {"X": np.ascontiguousarray(x.cpu().numpy())}

    def fn():
        return session.run(None, feed)

    def result():
        y, y_h = fn()
        return torch.from_numpy(y[:, 0]), torch.from_numpy(y_h)

    return fn, result


def _compile(shape, pass_, weights, x, grad_out, grad_h):
    # What a user would write: the Elman recurrence in plain torch, compiled whole.
    def elman(x, h, w_ih, w_hh, b_ih, b_hh):
        projected = x @ w_ih.T + b_ih
        outs = []
        for t in range(x.shape[0]):
            h = torch.tanh(projected[t] + h @ w_hh.T + b_hh)
            outs.append(h)
        return torch.stack(outs), h.unsqueeze(0)

    torch._dynamo.reset()  # each shape compiles afresh, with no recompilation limit in the way
    compiled = torch.compile(elman, dynamic=False)
    h0 = torch.zeros(shape[1], shape[3], dtype=x.dtype, device=x.device)
    sync = workloads._synchronizer(x.device)
    if pass_ == "fwd":

        def fn():
            result = compiled(x, h0, *weights)
            sync()
            return result

        fn.grad_enabled = False

        def first():
            with torch.no_grad():
                return fn()

        return fn, first

    params = [w.clone().requires_grad_(True) for w in weights]

    def train_step():
        for p in params:
            p.grad = None
        x.grad = None
        out, h_n = compiled(x, h0, *params)
        torch.autograd.backward((out, h_n), (grad_out, grad_h))
        sync()

    def first():
        train_step()
        return [p.grad for p in params] + [x.grad]

    return train_step, first
