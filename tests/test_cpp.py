"""The cpp backend's ops as torch sees them: opcheck, torch.compile(fullgraph=True), and parity for
every instruction set and both recurrence paths the extension can take on this machine."""

import itertools
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
from torch.nn.utils.rnn import pack_sequence

import myrnn_fast
from myrnn_fast import config, registry

from parity import assert_close, cell_pair, check_module, layer_args as _layer_args, randn as _randn, rnn_pair

pytestmark = pytest.mark.skipif(
    registry.unavailable_reason("cpp") is not None, reason=f"cpp: {registry.unavailable_reason('cpp')}"
)

if registry.unavailable_reason("cpp") is None:
    from myrnn_fast import _C, ops

    ISAS = _C.cpu_isas()
else:
    ISAS = []


@pytest.fixture(params=list(itertools.product(ISAS, ["tiles", "gemm"])), ids=lambda p: "-".join(p))
def isa_path(request):
    """Run the test with one instruction set forced, and one route for the recurrence, the
    gradients, the cell and the input projection (the kernels for "tiles", ATen's GEMMs for
    "gemm"), then restore."""
    isa, path = request.param
    route = "kernels" if path == "tiles" else "gemm"
    with config.override(cpu_isa=isa, cpu_path=path, cpu_grads=route, cpu_cell=route, cpu_projection=route):
        yield request.param


# ---- opcheck: schemas, fake implementations, autograd registration -------------------------


@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_opcheck_forward(packed, bias, nonlinearity, dtype):
    args = _layer_args(dtype=dtype, bias=bias, packed=packed, nonlinearity=nonlinearity)
    torch.library.opcheck(torch.ops.myrnn_fast.rnn_forward.default, args)


@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
@pytest.mark.parametrize("need_grad_x", [True, False])
@pytest.mark.parametrize("grads", ["both", "out only", "h_n only"])
def test_opcheck_backward(packed, need_grad_x, grads):
    x, h0, w_ih, w_hh, b_ih, b_hh, sizes, nl = _layer_args(packed=packed)
    with torch.no_grad():
        out, h_n = ops.rnn_forward(x, h0, w_ih, w_hh, b_ih, b_hh, sizes, nl)
    grad_out = _randn(*out.shape, seed=7, grad=False) if grads != "h_n only" else None
    grad_h_n = _randn(*h_n.shape, seed=8, grad=False) if grads != "out only" else None
    detached = [t.detach() for t in (x, h0, w_ih, w_hh, out)]
    torch.library.opcheck(
        torch.ops.myrnn_fast.rnn_backward.default, (grad_out, grad_h_n, *detached, sizes, nl, need_grad_x)
    )


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
def test_opcheck_cell(bias, nonlinearity):
    x, h0, w_ih, w_hh, b_ih, b_hh, _, _ = _layer_args(bias=bias)
    torch.library.opcheck(torch.ops.myrnn_fast.rnn_cell.default, (x[0], h0, w_ih, w_hh, b_ih, b_hh, nonlinearity))


# ---- every instruction set and both paths against torch.nn --------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("H", [1, 5, 16, 33, 70])
@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
def test_every_isa_and_path_dense(isa_path, dtype, H, nonlinearity):
    # Hidden sizes below, at and between vector widths, and batches around the 4-row tile.
    ref, ours = rnn_pair("cpp", 3, H, 2, nonlinearity=nonlinearity, bidirectional=True, dtype=dtype)

    def make():
        x = _randn(6, 9, 3, dtype=dtype, seed=1)
        hx = _randn(4, 9, H, dtype=dtype, seed=2)
        return (x, hx), [x, hx]

    check_module(ref, ours, make, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_every_isa_and_path_packed(isa_path, dtype):
    ref, ours = rnn_pair("cpp", 3, 20, 2, bidirectional=True, dtype=dtype)
    lengths = [7, 7, 5, 4, 4, 2, 1]

    def make():
        seqs = [_randn(n, 3, dtype=dtype, seed=10 + i) for i, n in enumerate(lengths)]
        return (pack_sequence(seqs),), seqs

    check_module(ref, ours, make, dtype)


@pytest.mark.parametrize("B", [1, 6])
def test_every_isa_and_path_cell(isa_path, B):
    ref, ours = cell_pair("cpp", 3, 37, nonlinearity="tanh")

    def make():
        x, h = _randn(B, 3, seed=1), _randn(B, 37, seed=2)
        return (x, h), [x, h]

    check_module(ref, ours, make, torch.float64)


def test_gradcheck_every_isa_and_path(isa_path):
    args = _layer_args(H=6, packed=True)
    tensors = [a for a in args[:6]]

    def fn(*t):
        return ops.rnn_forward(*t, args[6], args[7])

    assert torch.autograd.gradcheck(fn, tensors)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("H", [256, 300])
@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
def test_gemm_path_with_packed_weights(threads, H, nonlinearity):
    # From H = 256 the float32 forward's per-step GEMMs take W_hh packed per thread, one block of
    # columns each (300 leaves a ragged last block); packed input keeps the plain loop.
    ref, ours = rnn_pair("cpp", 5, H, nonlinearity=nonlinearity, dtype=torch.float32)

    def make():
        x = _randn(4, 3, 5, dtype=torch.float32, seed=1)
        hx = _randn(1, 3, H, dtype=torch.float32, seed=2)
        return (x, hx), [x, hx]

    def make_packed():
        seqs = [_randn(n, 5, dtype=torch.float32, seed=10 + n) for n in (4, 3, 1)]
        return (pack_sequence(seqs),), seqs

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with config.override(cpu_path="gemm"):
            check_module(ref, ours, make, torch.float32)
            check_module(ref, ours, make_packed, torch.float32)
    finally:
        torch.set_num_threads(before)


def test_large_batch_is_split_over_threads():
    # Enough rows and work to take the multi-threaded path; torch.nn is the judge (in float64:
    # float32 sums over 2560 rows differ by more than the tolerance in summation order alone).
    ref, ours = rnn_pair("cpp", 8, 32, dtype=torch.float64)

    def make():
        x = _randn(40, 64, 8, seed=3)
        return (x,), [x]

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        check_module(ref, ours, make, torch.float64)
    finally:
        torch.set_num_threads(before)


def test_tanh_kernel_matches_libm():
    # The float kernels use their own vectorized tanh: check it over the whole range, with the
    # special values, against torch.tanh in float64.
    z = torch.cat([torch.linspace(-12, 12, 200_001), torch.tensor([0.0, -0.0, 1e-30, 88.0, -100.0])])
    special = torch.tensor([float("inf"), -float("inf"), float("nan")])
    n = z.numel() + 3
    x = torch.cat([z, special]).reshape(n, 1, 1)
    one = torch.ones(1, 1)
    out, _ = ops.rnn_forward(x, torch.zeros(1, 1), one, torch.zeros(1, 1), None, None, None, "tanh")
    got = out.flatten()
    expected = torch.tanh(z.double())
    err = (got[: z.numel()].double() - expected).abs()
    assert err.max() < 4e-7, f"max abs error {err.max():.3g} at {z[err.argmax()]}"
    assert got[-3] == 1 and got[-2] == -1 and got[-1].isnan()


# ---- torch.compile ------------------------------------------------------------------------


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = myrnn_fast.RNN(1, 16, num_layers=2, batch_first=True, backend="cpp")
        self.fc = torch.nn.Linear(16, 1)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.fc(out[:, -1])


def test_torch_compile_fullgraph_matches_eager():
    torch.manual_seed(0)
    net = _Net()
    x = torch.randn(5, 12, 1)
    target = torch.randn(5, 1)

    def step(model):
        loss = torch.nn.functional.mse_loss(model(x), target)
        grads = torch.autograd.grad(loss, list(net.parameters()))
        return loss, grads

    torch._dynamo.reset()
    compiled = torch.compile(net, fullgraph=True, backend="aot_eager")
    loss_c, grads_c = step(compiled)
    loss_e, grads_e = step(net)
    torch.testing.assert_close(loss_c, loss_e)
    for a, b in zip(grads_c, grads_e):
        torch.testing.assert_close(a, b)


def test_torch_compile_graph_holds_one_op_per_layer():
    # What makes compiling quick: dynamo captures one graph with the op for each of the 2 layers,
    # not a loop unrolled over the time steps.
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    net = _Net()
    torch.compile(net, fullgraph=True, backend=record)(torch.randn(5, 12, 1))
    assert len(graphs) == 1
    targets = [node.target for node in graphs[0].graph.nodes if node.op == "call_function"]
    assert targets.count(torch.ops.myrnn_fast.rnn_forward.default) == 2
    assert len(targets) < 30, f"{len(targets)} calls: the time loop was unrolled"


def test_torch_compile_inductor_runs_the_op():
    torch.manual_seed(0)
    rnn = myrnn_fast.RNN(3, 8, backend="cpp")
    x = torch.randn(7, 2, 3)
    compiled = torch.compile(rnn, fullgraph=True)
    out_c, h_c = compiled(x)
    out_e, h_e = rnn(x)
    torch.testing.assert_close(out_c, out_e)
    torch.testing.assert_close(h_c, h_e)


# ---- how the extension reports and picks its kernels -----------------------------------------


def test_build_info_names_the_isa_in_use():
    assert _C.knobs()["cpu_isa"] == "auto"
    assert json.loads(_C.build_info())["cpu_isa"] == ISAS[-1]  # auto: the best one
    for isa in ISAS:
        with config.override(cpu_isa=isa):
            assert _C.knobs()["cpu_isa"] == isa
            assert json.loads(_C.build_info())["cpu_isa"] == isa
    assert ISAS[0] == "baseline"


def test_knobs_report_every_knob_with_its_default():
    # The extension's own defaults are config's, so a C++ caller without Python gets the same.
    owners = ("cpp", "cuda") if json.loads(_C.build_info())["cuda"] else ("cpp",)
    defaults = {k.name: k.default for k in config.KNOBS.values() if k.owner in owners}
    assert _C.knobs() == defaults
    with config.override(cpu_path="gemm", cpu_tiles_max_hidden=7):
        assert _C.knobs() == {**defaults, "cpu_path": "gemm", "cpu_tiles_max_hidden": 7}
    assert _C.knobs() == defaults


def test_bad_knob_values_raise_value_error():
    # Each error lists what would have been valid.
    with pytest.raises(ValueError, match="cpu_isa must be one of auto, baseline"):
        _C.set_knob("cpu_isa", "sse9")
    with pytest.raises(ValueError, match="cpu_path must be one of auto, tiles, gemm; got 'gpu'"):
        _C.set_knob("cpu_path", "gpu")
    with pytest.raises(ValueError, match="cpu_path must be one of .*; got 1"):
        _C.set_knob("cpu_path", 1)
    with pytest.raises(ValueError, match="unknown knob 'cpu_paths'; the knobs are .*cpu_isa, .*cpu_path"):
        _C.set_knob("cpu_paths", "gemm")
    for bad in (-1, "12", 1.5, True, 2**70):
        with pytest.raises(ValueError, match="cpu_tiles_max_hidden must be an integer >= 0"):
            _C.set_knob("cpu_tiles_max_hidden", bad)
    assert _C.knobs()["cpu_path"] == "auto" and _C.knobs()["cpu_tiles_max_hidden"] == 512


@pytest.mark.parametrize("isa", ISAS)
def test_env_var_selects_isa(isa):
    code = "import json, myrnn_fast; from myrnn_fast import _C; myrnn_fast.available_backends(); " \
           "print(_C.knobs()['cpu_isa'], json.loads(_C.build_info())['cpu_isa'])"
    env = {**os.environ, "MYRNN_CPU_ISA": isa}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert result.stdout.split() == [isa, isa]


def test_env_var_naming_an_isa_this_cpu_lacks_is_an_error_listing_the_ones_it_has():
    missing = [isa for isa in ("baseline", "avx2", "avx512") if isa not in ISAS]
    if not missing:
        pytest.skip("this CPU and build support every instruction set")
    code = "import myrnn_fast; myrnn_fast.available_backends()"
    env = {**os.environ, "MYRNN_CPU_ISA": missing[-1]}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert result.returncode != 0
    assert f"ValueError: MYRNN_CPU_ISA: myrnn_fast: knob cpu_isa must be one of auto, {', '.join(ISAS)}; " \
           f"got '{missing[-1]}'" in result.stderr


def test_auto_resolves_to_cpp_on_cpu():
    assert myrnn_fast.resolve_backend("cpu") == "cpp"


def test_bad_direct_calls_raise_not_crash():
    x, h0, w_ih, w_hh, b_ih, b_hh, _, _ = _layer_args()
    with pytest.raises(RuntimeError, match="w_hh must be square"):
        ops.rnn_forward(x, h0, w_ih, w_hh[:, :2], b_ih, b_hh, None, "tanh")
    with pytest.raises(RuntimeError, match="batch_sizes"):
        ops.rnn_forward(x.reshape(-1, 2), h0, w_ih, w_hh, b_ih, b_hh, torch.tensor([3, 4, 3, 2]), "tanh")
    with pytest.raises(RuntimeError, match="add up"):
        ops.rnn_forward(x.reshape(-1, 2), h0, w_ih, w_hh, b_ih, b_hh, torch.tensor([3, 3, 3]), "tanh")
    with pytest.raises(ValueError, match="nonlinearity"):
        ops.rnn_forward(x, h0, w_ih, w_hh, b_ih, b_hh, None, "gelu")


@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
def test_no_grad_calls_skip_the_dispatcher_with_the_same_results(packed):
    # Without autograd the backend calls the kernels through pybind11 (_C.rnn_forward_cpu,
    # _C.rnn_cell_cpu): same numbers as the ops, and the same refusals.
    from myrnn_fast.backends import _cpp

    args = _layer_args(packed=packed)
    with torch.no_grad():
        direct = _cpp.layer(*args[:6], args[7], args[6])
        cell = _cpp.cell(args[0][:3] if packed else args[0][0], args[1], *args[2:6], "tanh")
    via_op = ops.rnn_forward(*args)
    assert all(torch.equal(a, b) for a, b in zip(direct, via_op))
    assert torch.equal(cell, ops.rnn_cell(args[0][:3] if packed else args[0][0], args[1], *args[2:6], "tanh"))
    with torch.no_grad(), pytest.raises(RuntimeError, match="w_hh must be square"):
        _cpp.layer(args[0], args[1], args[2], args[3][:, :2], *args[4:6], "tanh", args[6])


def test_tensor_subclasses_go_through_the_ops():
    # Fake tensors (shape tracing outside torch.compile) must reach the ops' fake implementations,
    # not the pybind11 shortcut that reads data pointers.
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    rnn, cell = myrnn_fast.RNN(3, 5, backend="cpp"), myrnn_fast.RNNCell(3, 5, backend="cpp")
    with FakeTensorMode(allow_non_fake_inputs=True), torch.no_grad():
        out, h_n = rnn(torch.empty(4, 2, 3))
        h = cell(torch.empty(2, 3), torch.empty(2, 5))
    assert isinstance(out, FakeTensor) and out.shape == (4, 2, 5) and h_n.shape == (1, 2, 5)
    assert isinstance(h, FakeTensor) and h.shape == (2, 5)


def test_vmap_goes_through_the_ops():
    # torch.func's wrapped tensors are of type Tensor too: they must reach the ops (and the
    # dispatcher's batching fallback), not the C++ autograd node, which functorch refuses.
    rnn, cell = myrnn_fast.RNN(3, 5, backend="cpp"), myrnn_fast.RNNCell(3, 5, backend="cpp")
    xs, hs = torch.randn(2, 4, 1, 3), torch.randn(2, 1, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "There is a performance drop because we have not yet implemented..."
        out = torch.func.vmap(lambda x: rnn(x)[0])(xs)
        h = torch.func.vmap(cell)(xs[:, 0], hs)
    assert torch.equal(out, torch.stack([rnn(x)[0] for x in xs]))
    assert torch.equal(h, torch.stack([cell(x, h) for x, h in zip(xs[:, 0], hs)]))


def test_torch_compile_in_a_fresh_process():
    # Compiling before any eager call means the backend is resolved while dynamo traces, which once
    # failed a guard on the registry's cache ("Guard failed on the same frame it was created").
    code = (
        "import torch, myrnn_fast\n"
        "rnn, cell = myrnn_fast.RNN(2, 4, backend='cpp'), myrnn_fast.RNNCell(2, 4)\n"
        "x = torch.randn(3, 2, 2)\n"
        "out, h = torch.compile(rnn, fullgraph=True, backend='aot_eager')(x)\n"
        "torch.testing.assert_close(out, rnn(x)[0])\n"
        "y = torch.compile(cell, fullgraph=True, backend='aot_eager')(x[0], h[0])\n"
        "torch.testing.assert_close(y, cell(x[0], h[0]))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
@pytest.mark.parametrize("grads", ["both", "out only", "h_n only", "neither"])
@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
def test_backward_paths_agree_for_every_incoming_grad(packed, grads, nonlinearity):
    # Path "gemm" (the per-step GEMM loop of ops/rnn_layer.h, shared with CUDA) against "tiles",
    # with autograd's undefined gradients in every combination.
    x, h0, w_ih, w_hh, _, _, sizes, _ = _layer_args(T=5, B=4, H=7, packed=packed, bias=False)
    detached = [t.detach() for t in (x, h0, w_ih, w_hh)]
    out, h_n = ops.rnn_forward(*detached, None, None, sizes, nonlinearity)
    grad_out = _randn(*out.shape, seed=7, grad=False) if grads in ("both", "out only") else None
    grad_h_n = _randn(*h_n.shape, seed=8, grad=False) if grads in ("both", "h_n only") else None
    results = {}
    for path in ("tiles", "gemm"):
        with config.override(cpu_path=path):
            results[path] = ops.rnn_backward(grad_out, grad_h_n, *detached, out, sizes, nonlinearity, True)
    for name, a, b in zip(("x", "h0", "w_ih", "w_hh", "b"), results["tiles"], results["gemm"]):
        torch.testing.assert_close(b, a, msg=lambda m: f"grad of {name}: {m}")
    if grads == "neither":
        assert all(torch.count_nonzero(g) == 0 for g in results["gemm"])


# ---- the backward's gradients formed in the kernels (cpu_grads) against the ATen GEMMs ------


@pytest.fixture(params=list(itertools.product(ISAS, ["kernels", "gemm"])), ids=lambda p: "-".join(p))
def isa_grads(request):
    """Run the test with one instruction set and one way of forming the gradients, then restore."""
    isa, grads = request.param
    with config.override(cpu_isa=isa, cpu_grads=grads):
        yield request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("H", [1, 5, 16, 33])
@pytest.mark.parametrize("I", [1, 3, 20])
def test_every_isa_and_grads_path_dense(isa_grads, dtype, H, I):
    # Hidden and input sizes below, at and between vector widths (input size 1 is the article's),
    # batches around the register tiles' row counts: outputs, h_n and the gradients of x, h0 and
    # every parameter against torch.nn.
    ref, ours = rnn_pair("cpp", I, H, 2, bidirectional=True, dtype=dtype)

    def make():
        x = _randn(6, 9, I, dtype=dtype, seed=1)
        hx = _randn(4, 9, H, dtype=dtype, seed=2)
        return (x, hx), [x, hx]

    check_module(ref, ours, make, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("H", [5, 33])
def test_every_isa_and_grads_path_16_bit(isa_grads, dtype, H):
    # One layer, so that the comparison measures this layer's rounding rather than rounding
    # compounded through layers: within a few ulps of the largest value, as torch.nn's own
    # 16-bit RNN differs from itself with the order of operations.
    ref, ours = rnn_pair("cpp", 3, H, 1, dtype=dtype)
    x = _randn(6, 9, 3, dtype=dtype, seed=1, grad=False).requires_grad_()
    hx = _randn(1, 9, H, dtype=dtype, seed=2, grad=False).requires_grad_()
    weights = torch.linspace(-1, 1, 6 * 9 * H, dtype=torch.float64).reshape(6, 9, H).to(dtype)
    results = []
    for module in (ours, ref):
        out, h_n = module(x, hx)
        loss = (out * weights).sum() + h_n.sum()
        results.append([out, h_n, *torch.autograd.grad(loss, [x, hx, *module.parameters()])])
    eps = torch.finfo(dtype).eps
    for name, a, b in zip(["out", "h_n", "x", "hx", "w_ih", "w_hh", "b_ih", "b_hh"], *results):
        assert a.dtype == dtype, name
        bound = 32 * eps * (1 + b.abs().max().item())
        assert (a.double() - b.double()).abs().max().item() <= bound, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_tiles_form_univariate_projections_as_the_projection_pass(dtype, packed, bias):
    # With input size 1 the tiles' forward forms x w + b in its registers; path gemm takes them
    # from project_univariate's pass. W_hh = 0 with relu makes every output the rounded
    # projection itself (where positive), whatever the recurrence: the two paths must agree
    # exactly, on every ISA, on one thread and on two (rows split), H with a vector tail, and
    # with float64 to the dtype's rounding.
    T, B, H = 7, 11, 21
    g = torch.Generator().manual_seed(5)
    w_ih = (torch.randn(H, 1, generator=g) * 0.5).to(dtype)
    b_ih, b_hh = [(torch.randn(H, generator=g) * 0.5).to(dtype) if bias else None for _ in range(2)]
    w_hh, h0 = torch.zeros(H, H, dtype=dtype), (torch.randn(B, H, generator=g) * 0.5).to(dtype)
    lengths = [7, 7, 6, 5, 5, 4, 3, 3, 2, 1, 1]
    if packed:
        x = pack_sequence([torch.randn(n, 1, generator=g).to(dtype) for n in lengths]).data
        batch_sizes = torch.tensor([sum(n > t for n in lengths) for t in range(T)])
    else:
        x, batch_sizes = torch.randn(T, B, 1, generator=g).to(dtype), None
    exact = x.double().reshape(-1, 1) @ w_ih.double().T
    if bias:
        exact = exact + b_ih.double() + b_hh.double()
    exact = torch.relu(exact)

    def forward(isa, path):
        with config.override(cpu_isa=isa, cpu_path=path, cpu_parallel_min_work=0):
            return _C.rnn_forward_cpu(x, h0, w_ih, w_hh, b_ih, b_hh, batch_sizes, "relu")[0]

    for isa, n_threads in itertools.product(ISAS, (1, 2)):
        out = {path: _on_threads(n_threads, lambda: forward(isa, path)) for path in ("tiles", "gemm")}
        assert out["tiles"].dtype == out["gemm"].dtype == dtype
        assert torch.equal(out["tiles"], out["gemm"]), (isa, n_threads)
        eps = torch.finfo(dtype).eps  # the bias sum and the product each round once (float32, float64)
        torch.testing.assert_close(out["tiles"].double().reshape(-1, H), exact, rtol=4 * eps,
                                   atol=4 * eps * exact.abs().max().item(), msg=f"{isa} {n_threads}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_every_isa_and_grads_path_packed(isa_grads, dtype):
    ref, ours = rnn_pair("cpp", 3, 20, 2, dtype=dtype)
    lengths = [7, 7, 5, 4, 4, 2, 1]

    def make():
        seqs = [_randn(n, 3, dtype=dtype, seed=10 + i) for i, n in enumerate(lengths)]
        return (pack_sequence(seqs),), seqs

    check_module(ref, ours, make, dtype)


def test_gradcheck_every_isa_and_grads_path(isa_grads):
    for packed in (False, True):
        args = _layer_args(H=6, packed=packed)

        def fn(*t):
            return ops.rnn_forward(*t, args[6], args[7])

        assert torch.autograd.gradcheck(fn, list(args[:6]))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
@pytest.mark.parametrize("need_grad_x", [True, False])
@pytest.mark.parametrize("grads", ["both", "out only", "h_n only", "neither"])
def test_grads_kernels_match_the_gemms(threads, packed, need_grad_x, grads):
    # Every incoming-gradient combination, with and without grad x, on one thread and split over
    # two (each with its own accumulator, summed after): the same results as the ATen GEMMs.
    x, h0, w_ih, w_hh, _, _, sizes, _ = _layer_args(T=5, B=7, I=3, H=18, packed=packed, bias=False)
    detached = [t.detach() for t in (x, h0, w_ih, w_hh)]
    out, h_n = ops.rnn_forward(*detached, None, None, sizes, "tanh")
    grad_out = _randn(*out.shape, seed=7, grad=False) if grads in ("both", "out only") else None
    grad_h_n = _randn(*h_n.shape, seed=8, grad=False) if grads in ("both", "h_n only") else None
    results = {}
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for how in ("kernels", "gemm"):
            with config.override(cpu_grads=how, cpu_parallel_min_work=0):
                results[how] = ops.rnn_backward(grad_out, grad_h_n, *detached, out, sizes, "tanh", need_grad_x)
    finally:
        torch.set_num_threads(saved)
    for name, a, b in zip(("x", "h0", "w_ih", "w_hh", "b"), results["kernels"], results["gemm"]):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=lambda m: f"grad of {name}: {m}")
    if grads == "neither":
        assert all(torch.count_nonzero(g) == 0 for g in results["kernels"])


def test_grads_knob_rejects_unknown_values():
    with pytest.raises(ValueError, match="cpu_grads must be one of auto, kernels, gemm; got 'blas'"):
        _C.set_knob("cpu_grads", "blas")
    with pytest.raises(ValueError, match="cpu_grads_kernels_max_work must be an integer >= 0"):
        _C.set_knob("cpu_grads_kernels_max_work", -1)
    assert _C.knobs()["cpu_grads"] == "auto"


@pytest.mark.skipif("avx512bf16" not in ISAS, reason="needs AVX512-BF16 in this CPU and build")
@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
@pytest.mark.parametrize("batch", [1, 5])
def test_bfloat16_float32_products_run_the_float_scratch_with_native_conversions(nonlinearity, batch):
    # With cpu_bf16_products float32 the AVX512-BF16 table's bfloat16 recurrences keep a float32
    # state (b16_float): the same arithmetic as the AVX-512 table's, whose conversions are
    # emulated, so forward and backward agree bit for bit (on inputs without subnormals, which
    # vcvtneps2bf16 flushes). Both products are checked against torch.nn in test_autotune.
    rnn = myrnn_fast.RNN(3, 40, nonlinearity=nonlinearity, backend="cpp").bfloat16()
    x = torch.randn(30, batch, 3, dtype=torch.bfloat16, requires_grad=True)
    results = []
    for isa in ("avx512", "avx512bf16"):
        with config.override(cpu_isa=isa, cpu_path="tiles", cpu_bf16_products="float32"):
            out, h_n = rnn(x)
            grads = torch.autograd.grad((out * out).sum() + h_n.sum(), [x, *rnn.parameters()])
        results.append((out, h_n, *grads))
    for a, b in zip(*results):
        assert torch.equal(a, b)


def _on_threads(n, fn):
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(n)
        return fn()
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("x_grad", [True, False], ids=["dx", "no-dx"])
@pytest.mark.parametrize("B", [1, 3])
def test_kernel_grads_split_over_steps_match_torch(dtype, x_grad, B):
    # With fewer rows than threads (B = 1 on two threads) and 64 x 48 x (48 + 8 or 16) multiply-adds,
    # above cpu_parallel_min_work, the kernels' weight gradients split the steps over the threads:
    # every span but the first starts from the step before it, and only the first writes grad h0.
    # B = 3 (more rows than threads) takes the split over rows: both against torch.nn.
    ref, ours = rnn_pair("cpp", 8, 48, dtype=dtype)

    def make():
        x, h0 = _randn(64, B, 8, dtype=dtype, seed=1, grad=x_grad), _randn(1, B, 48, dtype=dtype, seed=2)
        return (x, h0), [x, h0] if x_grad else [h0]

    with config.override(cpu_grads="kernels", cpu_path="tiles"):
        _on_threads(2, lambda: check_module(ref, ours, make, dtype))


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_kernel_backward_in_blocks_of_rows_matches_one_thread_and_torch(dtype, packed, threads):
    # On several threads the tiles' reverse recurrence and the kernels' gradients hand each
    # thread's block of rows a dz and a grad x of its own, gathered after: 5 rows in blocks of 3
    # and 2 (two threads) or 2, 2 and 1 (three), packed sequences ending at different steps.
    # A row's dz does not depend on the split; its grad x and grad h0 are the same dot products
    # (in register tiles of other row counts, whose contracted multiply-adds may round the last
    # bit otherwise); the weight gradients are the same sums in another order. float32 and
    # float64 are also checked against torch.nn.
    torch.manual_seed(3)
    rnn = myrnn_fast.RNN(6, 40, backend="cpp").to(dtype)
    lengths = [40, 40, 30, 20, 2] if packed else [40] * 5  # 132 x 40 x 40 exceeds cpu_parallel_min_work
    seqs = [torch.randn(n, 6, dtype=dtype) for n in lengths]

    def grads():
        xs = [s.clone().requires_grad_() for s in seqs]
        h0 = torch.randn(1, 5, 40, dtype=dtype, generator=torch.Generator().manual_seed(4)).requires_grad_()
        x = pack_sequence(xs) if packed else torch.stack(xs, 1)
        out, h_n = rnn(x, h0)
        out = out.data if packed else out
        loss = (out * torch.linspace(-1, 1, out.numel(), dtype=dtype).view_as(out)).sum() + (h_n * h_n).sum()
        return torch.autograd.grad(loss, [*xs, h0, *rnn.parameters()], allow_unused=True)

    with config.override(cpu_grads="kernels", cpu_path="tiles"):
        split, alone = _on_threads(threads, grads), _on_threads(1, grads)
    rows = len(seqs) + 1  # the inputs' and h0's gradients, then the weights'
    for i, (a, b) in enumerate(zip(split, alone)):
        if i >= rows and dtype == torch.float32:  # 200-term sums with cancellation, reordered
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=lambda m: f"gradient {i}: {m}")
        else:
            assert_close(a, b, dtype, f"gradient {i}")
    if dtype in (torch.float32, torch.float64) and packed:
        ref = torch.nn.RNN(6, 40).to(dtype)
        ref.load_state_dict(rnn.state_dict())

        def make():
            xs = [s.clone().requires_grad_() for s in seqs]
            h0 = torch.randn(1, 5, 40, dtype=dtype, generator=torch.Generator().manual_seed(4))
            return (pack_sequence(xs), h0), xs

        with config.override(cpu_grads="kernels", cpu_path="tiles"):
            _on_threads(threads, lambda: check_module(ref, rnn, make, dtype))


def test_kernel_grads_split_over_steps_in_bfloat16_match_one_thread():
    # torch.nn's bfloat16 gradients round every step's intermediates, so they are no reference
    # for a 64-step sum; one thread (no split) is: the same float32 sums in another order, each
    # gradient rounded once, so they agree to a bfloat16 ulp.
    rnn = myrnn_fast.RNN(8, 48, backend="cpp").bfloat16()
    x = _randn(64, 1, 8, dtype=torch.bfloat16, seed=1)
    h0 = _randn(1, 1, 48, dtype=torch.bfloat16, seed=2)

    def grads():
        out, h_n = rnn(x, h0)
        return torch.autograd.grad((out * out).sum() + h_n.sum(), [x, h0, *rnn.parameters()])

    with config.override(cpu_grads="kernels", cpu_path="tiles"):
        split, alone = _on_threads(2, grads), _on_threads(1, grads)
    for a, b in zip(split, alone):
        torch.testing.assert_close(a, b, rtol=2**-7, atol=1e-3)


@pytest.mark.parametrize("batch,hidden", [(5, 6), (4, 4), (1, 3), (9, 33), (13, 150)])
def test_cell_kernel_gives_a_row_the_same_result_wherever_it_sits(batch, hidden):
    # The cell kernels work in blocks of rows and units (4 x 4 with AVX-512): a row repeated
    # at the last position, inside a partial block, must come out bit-identical to the first.
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        cell = myrnn_fast.RNNCell(7, hidden, backend="cpp").to(dtype)
        x, h = torch.randn(batch, 7, dtype=dtype), torch.randn(batch, hidden, dtype=dtype)
        x[-1], h[-1] = x[0], h[0]
        with config.override(cpu_cell="kernels"), torch.no_grad():
            y = cell(x, h)
            alone = cell(x[:1], h[:1])
        assert torch.equal(y[-1], y[0]) and torch.equal(y[0], alone[0]), dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cell_kernel_split_over_threads_matches_one_thread_and_torch(dtype):
    # 13 x 150 x (7 + 150) multiply-adds exceed cpu_parallel_min_work: the kernels' step runs
    # on two threads, each on its own rows, and must give what one thread gives, and torch.nn's
    # values within the dtype's tolerance.
    torch.manual_seed(1)
    ref = torch.nn.RNNCell(7, 150).to(dtype)
    cell = myrnn_fast.RNNCell(7, 150, backend="cpp").to(dtype)
    cell.load_state_dict(ref.state_dict())
    x, h = torch.randn(13, 7, dtype=dtype), torch.randn(13, 150, dtype=dtype)
    threads = torch.get_num_threads()
    try:
        with config.override(cpu_cell="kernels"), torch.no_grad():
            torch.set_num_threads(2)
            split = cell(x, h)
            torch.set_num_threads(1)
            alone = cell(x, h)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(split, alone)
    with torch.no_grad():
        assert_close(split, ref(x, h), dtype, "cell output")
