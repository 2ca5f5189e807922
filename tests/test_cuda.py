"""The cpp backend on CUDA against torch.nn.RNN on cuDNN, with the same weights: outputs, h_n and every
gradient, for every recurrence path (the persistent kernels with W_hh in registers or in shared
memory, and the per-step cuBLAS loop), every rows-per-block variant, packed input, float32/float64
and float16/bfloat16; gradcheck in float64, opcheck, torch.compile(fullgraph=True), CUDA graphs,
streams and no host synchronization. Skipped without a GPU.

The kernels' bodies are also checked without a GPU, on the CPU, by test_cuda_sim.py."""

import pytest
import torch
from torch.nn.utils.rnn import pack_sequence

import myrnn_fast
from myrnn_fast import config, registry

from parity import assert_close, cell_pair, check_module, layer_args, randn, rnn_pair

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(registry.unavailable_reason("cpp") is not None, reason="the extension is not built"),
]

if torch.cuda.is_available() and registry.unavailable_reason("cpp") is None:
    from myrnn_fast import _C, ops
    from myrnn_fast.backends import _cpp

CUDA = "cuda"
I = 3  # noqa: E741


@pytest.fixture(autouse=True)
def exact_float32():
    """cuDNN may run float32 RNNs on TF32 tensor cores (torch.backends.cudnn.allow_tf32 is on by
    default): the judge must compute in float32 proper, and so must cuBLAS for us."""
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


@pytest.fixture(params=["registers", "shared", "gemm"])
def path(request):
    """Force one recurrence path for the test, then go back to choosing: the persistent kernels with
    W_hh in registers or in shared memory, or the per-step cuBLAS loop."""
    with config.override(cuda_path=request.param):
        yield request.param


def skip_unless_fits(path, H, dtype):
    """The register kernels hold a column of up to 128 float32 or 64 float64 values."""
    if path == "registers" and H > (64 if dtype == torch.float64 else 128):
        pytest.skip(f"H={H} in {dtype} does not fit the register kernels")


@pytest.fixture(params=[(r, p) for p in ("registers", "shared") for r in (1, 2, 4, 8)],
                ids=lambda rp: f"rows{rp[0]}-{rp[1]}")
def rows_per_block(request):
    rows, path = request.param
    with config.override(cuda_path=path, cuda_rows_per_block=rows):
        yield rows


def _randn(*shape, device=CUDA, **kwargs):
    return randn(*shape, device=device, **kwargs)


def _layer_args(**kwargs):
    return layer_args(I=I, device=CUDA, **kwargs)


def dense(T, B, H, layers=1, directions=1, dtype=torch.float64, batch_first=False, with_hx=True):
    def make():
        x = _randn(*((B, T, I) if batch_first else (T, B, I)), dtype=dtype, seed=1)
        if not with_hx:
            return (x,), [x]
        hx = _randn(layers * directions, B, H, dtype=dtype, seed=2)
        return (x, hx), [x, hx]

    return make


def packed(lengths, H, layers=1, directions=1, dtype=torch.float64, enforce_sorted=True):
    def make():
        seqs = [_randn(n, I, dtype=dtype, seed=10 + i) for i, n in enumerate(lengths)]
        hx = _randn(layers * directions, len(lengths), H, dtype=dtype, seed=3)
        return (pack_sequence(seqs, enforce_sorted=enforce_sorted), hx), [*seqs, hx]

    return make


def test_extension_was_built_with_cuda_and_auto_picks_it():
    # (build_info's "cuda" says the same; test_extension.py checks that one.)
    assert hasattr(_C, "rnn_forward_cuda"), "a GPU is here but _C was built without CUDA kernels"
    assert "cuda" in _cpp.DEVICE_TYPES
    assert myrnn_fast.resolve_backend(CUDA) == "cpp"


# ---- parity with cuDNN ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("layers,bidirectional", [(1, False), (2, True)])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_dense(path, dtype, layers, bidirectional, batch_first, nonlinearity, bias):
    H = 21
    ref, ours = rnn_pair("cpp", I, H, layers, nonlinearity=nonlinearity, bias=bias, batch_first=batch_first,
                         bidirectional=bidirectional, dtype=dtype, device=CUDA)
    directions = 2 if bidirectional else 1
    check_module(ref, ours, dense(5, 6, H, layers, directions, dtype, batch_first), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("H", [1, 5, 32, 33, 64, 120])
@pytest.mark.parametrize("B", [1, 3, 40])
def test_hidden_and_batch_sizes(path, dtype, H, B):
    # Below, at and past the 4-wide loads, the 32-thread warp and each register width (32, 64,
    # 128); cuDNN's persistent case (120).
    skip_unless_fits(path, H, dtype)
    ref, ours = rnn_pair("cpp", I, H, 1, dtype=dtype, device=CUDA)
    check_module(ref, ours, dense(7, B, H, dtype=dtype), dtype)


@pytest.mark.parametrize("packed_input", [False, True], ids=["dense", "packed"])
@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
def test_every_rows_per_block(rows_per_block, packed_input, nonlinearity):
    # 11 rows: a partial last block for every variant but 1 row per block.
    ref, ours = rnn_pair("cpp", I, 37, 1, nonlinearity=nonlinearity, dtype=torch.float64, device=CUDA)
    make = packed([9, 8, 8, 6, 5, 5, 4, 3, 2, 2, 1], 37) if packed_input else dense(6, 11, 37)
    check_module(ref, ours, make, torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize(
    "lengths,enforce_sorted", [([5, 3, 3, 1], True), ([2, 5, 1, 4], False), ([3], True), ([1, 1, 1], False)]
)
@pytest.mark.parametrize("layers,bidirectional", [(1, False), (2, True)])
def test_packed(path, dtype, lengths, enforce_sorted, layers, bidirectional):
    H = 9
    ref, ours = rnn_pair("cpp", I, H, layers, bidirectional=bidirectional, dtype=dtype, device=CUDA)
    directions = 2 if bidirectional else 1
    check_module(ref, ours, packed(lengths, H, layers, directions, dtype, enforce_sorted), dtype)


def test_largest_persistent_hidden_size(path):
    # float32 H = 200 still fits one block's shared memory on an H100 (up to 8 rows of state).
    skip_unless_fits(path, 200, torch.float32)
    ref, ours = rnn_pair("cpp", I, 200, 1, dtype=torch.float32, device=CUDA)
    check_module(ref, ours, dense(4, 4, 200, dtype=torch.float32), torch.float32)


def test_large_hidden_and_batch():
    # What auto sends to cuBLAS (H = 300 does not fit shared memory).
    ref, ours = rnn_pair("cpp", I, 300, 1, dtype=torch.float32, device=CUDA)
    check_module(ref, ours, dense(4, 70, 300, dtype=torch.float32), torch.float32)


@pytest.mark.parametrize("T,B", [(3, 0), (1, 1), (1, 5)])
def test_empty_batch_and_single_step(T, B):
    # cuDNN refuses some empty shapes, so the judge is torch.nn on the CPU, moved over.
    cpu_ref, ours = rnn_pair("cpp", I, 6, 2, bidirectional=True, dtype=torch.float64, device=CUDA)
    cpu_ref = cpu_ref.cpu()
    x = _randn(T, B, I, grad=False)
    hx = _randn(4, B, 6, seed=2, grad=False)
    out, h_n = ours(x, hx)
    ref_out, ref_h = cpu_ref(x.cpu(), hx.cpu())
    assert_close(out.cpu(), ref_out, torch.float64, "out")
    assert_close(h_n.cpu(), ref_h, torch.float64, "h_n")


REDUCED_TOLERANCE = {torch.float16: dict(rtol=1e-2, atol=1e-2), torch.bfloat16: dict(rtol=5e-2, atol=5e-2)}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("H", [16, 200])
def test_reduced_precision_against_float32(path, dtype, H):
    skip_unless_fits(path, H, dtype)
    # Computed in float32 and rounded once: judged against cuDNN in float32 on the same rounded
    # weights and inputs, within what the storage type can hold.
    torch.manual_seed(0)
    ours = myrnn_fast.RNN(I, H, 2, device=CUDA, dtype=dtype, backend="cpp")
    ref = torch.nn.RNN(I, H, 2, device=CUDA, dtype=torch.float32)
    ref.load_state_dict({k: v.float() for k, v in ours.state_dict().items()})
    x = _randn(6, 5, I, dtype=dtype, seed=1)
    x_ref = x.detach().float().requires_grad_()
    out, h_n = ours(x)
    ref_out, ref_h = ref(x_ref)
    assert out.dtype == h_n.dtype == dtype
    tol = REDUCED_TOLERANCE[dtype]
    torch.testing.assert_close(out.float(), ref_out, **tol)
    torch.testing.assert_close(h_n.float(), ref_h, **tol)
    (out.float().sum() + h_n.float().square().sum()).backward()
    (ref_out.sum() + ref_h.square().sum()).backward()
    torch.testing.assert_close(x.grad.float(), x_ref.grad, **tol)
    for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
        assert p.grad.dtype == dtype, name
        torch.testing.assert_close(p.grad.float(), q.grad, **tol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
@pytest.mark.parametrize("B", [1, 6])
def test_cell(bias, nonlinearity, B):
    ref, ours = cell_pair("cpp", I, 37, bias=bias, nonlinearity=nonlinearity, device=CUDA)

    def make():
        x, h = _randn(B, I, seed=1), _randn(B, 37, seed=2)
        return (x, h), [x, h]

    check_module(ref, ours, make, torch.float64)
    with torch.no_grad():  # the dispatcher-free step
        x, h = _randn(B, I, seed=1, grad=False), _randn(B, 37, seed=2, grad=False)
        assert_close(ours(x, h), ref(x, h), torch.float64, "no-grad step")


# ---- gradcheck and opcheck ----------------------------------------------------------------


@pytest.mark.parametrize("packed_input", [False, True], ids=["dense", "packed"])
@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
def test_gradcheck(path, packed_input, nonlinearity):
    args = _layer_args(H=6, packed=packed_input, nonlinearity=nonlinearity)

    def fn(*t):
        return ops.rnn_forward(*t, args[6], args[7])

    assert torch.autograd.gradcheck(fn, args[:6])


def test_gradcheck_cell():
    x, h, w_ih, w_hh, b_ih, b_hh, _, _ = _layer_args(H=6)
    assert torch.autograd.gradcheck(lambda *t: ops.rnn_cell(*t, "tanh"), (x[0], h, w_ih, w_hh, b_ih, b_hh))


@pytest.mark.parametrize("packed_input", [False, True], ids=["dense", "packed"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_opcheck_forward(path, packed_input, bias, dtype):
    args = _layer_args(dtype=dtype, bias=bias, packed=packed_input)
    torch.library.opcheck(torch.ops.myrnn_fast.rnn_forward.default, args)


@pytest.mark.parametrize("packed_input", [False, True], ids=["dense", "packed"])
@pytest.mark.parametrize("grads", ["both", "out only", "h_n only"])
def test_opcheck_backward(path, packed_input, grads):
    x, h0, w_ih, w_hh, b_ih, b_hh, sizes, nl = _layer_args(packed=packed_input)
    with torch.no_grad():
        out, h_n = ops.rnn_forward(x, h0, w_ih, w_hh, b_ih, b_hh, sizes, nl)
    grad_out = _randn(*out.shape, seed=7, grad=False) if grads != "h_n only" else None
    grad_h_n = _randn(*h_n.shape, seed=8, grad=False) if grads != "out only" else None
    detached = [t.detach() for t in (x, h0, w_ih, w_hh, out)]
    torch.library.opcheck(torch.ops.myrnn_fast.rnn_backward.default, (grad_out, grad_h_n, *detached, sizes, nl, True))


def test_opcheck_cell():
    x, h0, w_ih, w_hh, b_ih, b_hh, _, _ = _layer_args()
    torch.library.opcheck(torch.ops.myrnn_fast.rnn_cell.default, (x[0], h0, w_ih, w_hh, b_ih, b_hh, "relu"))


# ---- torch.compile ------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(backend):
    torch.manual_seed(0)
    rnn = myrnn_fast.RNN(1, 16, num_layers=2, batch_first=True, backend="cpp", device=CUDA)
    x = torch.randn(5, 12, 1, device=CUDA)

    def step(model):
        out, h_n = model(x)
        loss = out.square().mean() + h_n.sum()
        return loss, torch.autograd.grad(loss, list(rnn.parameters()))

    torch._dynamo.reset()
    loss_c, grads_c = step(torch.compile(rnn, fullgraph=True, backend=backend))
    loss_e, grads_e = step(rnn)
    torch.testing.assert_close(loss_c, loss_e)
    for a, b in zip(grads_c, grads_e):
        torch.testing.assert_close(a, b)


# ---- streams, devices, synchronization ----------------------------------------------------


@pytest.mark.parametrize("packed_input", [False, True], ids=["dense", "packed"])
def test_no_host_synchronization(path, packed_input):
    # torch raises on anything that would make the host wait for the GPU.
    args = _layer_args(H=40, packed=packed_input)
    detached = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out, h_n = ops.rnn_forward(*detached)
        ops.rnn_backward(out, h_n, *detached[:4], out, detached[6], detached[7], True)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("forced", ["registers", "shared"])
def test_forced_persistent_path_runs_a_batch_larger_than_one_wave(forced):
    # 20,000 rows at 8 per block is more blocks than an H100 holds at once: several waves.
    with config.override(cuda_path=forced):
        ref, ours = rnn_pair("cpp", I, 64, 1, dtype=torch.float32, device=CUDA)
        x = _randn(3, 20_000, I, dtype=torch.float32, grad=False)
        with torch.no_grad():
            (a, ha), (b, hb) = ours(x), ref(x)
        assert_close(a, b, torch.float32, "out")
        assert_close(ha, hb, torch.float32, "h_n")


def test_cuda_graph_capture_and_replay(path):
    # Dense input records no host copies, so a captured forward replays on new data.
    args = [a.detach() if isinstance(a, torch.Tensor) else a for a in _layer_args(T=6, B=4, H=33)]
    static_x = args[0].clone()
    ops.rnn_forward(static_x, *args[1:])  # warm-up: plans and kernels are loaded outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out, static_h = ops.rnn_forward(static_x, *args[1:])
    fresh = _randn(*static_x.shape, seed=42, grad=False)
    static_x.copy_(fresh)
    graph.replay()
    expected_out, expected_h = ops.rnn_forward(fresh, *args[1:])
    torch.testing.assert_close(static_out, expected_out)
    torch.testing.assert_close(static_h, expected_h)


def test_runs_on_the_current_stream(path):
    rnn = myrnn_fast.RNN(I, 33, 2, backend="cpp", device=CUDA, dtype=torch.float64)
    x = _randn(50, 8, I, grad=False)
    expected, _ = rnn(x)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        y = x * 1.0  # produced on the side stream: the kernels must be ordered after it
        got, _ = rnn(y)
    torch.cuda.current_stream().wait_stream(side)
    torch.testing.assert_close(got, expected)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_device_guard_follows_the_input():
    ref, ours = rnn_pair("cpp", I, 8, 1, dtype=torch.float64, device="cuda:1")
    def make():
        x = _randn(4, 2, I, device="cuda:1")
        return (x,), [x]

    with torch.cuda.device(0):
        check_module(ref, ours, make, torch.float64)


def test_bad_knob_values_raise_value_error():
    with pytest.raises(ValueError, match="cuda_path must be one of auto, registers, shared, gemm; got 'cudnn'"):
        _C.set_knob("cuda_path", "cudnn")
    with pytest.raises(ValueError, match="cuda_rows_per_block must be one of 0, 1, 2, 4, 8; got 3"):
        _C.set_knob("cuda_rows_per_block", 3)
    assert _C.knobs()["cuda_path"] == "auto" and _C.knobs()["cuda_rows_per_block"] == 0


@pytest.mark.parametrize("forced,H,message", [
    ("shared", 300, "hidden size 300 in Double does not fit one block's shared memory"),
    ("registers", 65, "hidden size 65 in Double is too large to keep W_hh in registers"),
])
def test_forced_persistent_paths_refuse_what_does_not_fit(forced, H, message):
    args = _layer_args(H=H, dtype=torch.float64)
    with config.override(cuda_path=forced), pytest.raises(RuntimeError, match=message):
        ops.rnn_forward(*[a.detach() if isinstance(a, torch.Tensor) else a for a in args])


# ---- autocast and GradScaler ----------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("module", ["RNN", "RNNCell"])
def test_cuda_autocast_matches_torch(dtype, module):
    # The same casts as torch.nn's RNN ops on autocast's CUDA list: outputs in the autocast dtype,
    # float32 parameters with float32 gradients, values within the dtype's tolerance of cuDNN's.
    from parity import TOLERANCES

    pair = rnn_pair if module == "RNN" else cell_pair
    args = (I, 6, 2) if module == "RNN" else (I, 6)
    ref, ours = pair("cpp", *args, dtype=torch.float32, device=CUDA)

    def make_inputs():
        x = randn(*((5,) if module == "RNN" else ()), 4, I, dtype=torch.float32, seed=1, device=CUDA)
        return (x,), [x]

    def call(m, inputs):
        with torch.autocast("cuda", dtype=dtype):
            return m(*inputs)

    outputs = check_module(ref, ours, make_inputs, dtype, call=call)
    assert all(t.dtype == dtype for t in outputs)
    with torch.autocast("cuda", dtype=dtype):  # the op itself, reached without the module
        out, h_n = ops.rnn_forward(*layer_args(dtype=torch.float32, device=CUDA))
    assert out.dtype == h_n.dtype == dtype


def test_cuda_gradscaler_training_loop_follows_torch():
    # A float16 autocast training loop with GradScaler: the same losses and parameters as the
    # same loop around torch.nn.RNN, within float16's tolerance.
    from parity import TOLERANCES

    torch.manual_seed(0)
    ref, ours = rnn_pair("cpp", I, 16, dtype=torch.float32, device=CUDA)
    heads = [torch.nn.Linear(16, 1, device=CUDA) for _ in range(2)]
    heads[1].load_state_dict(heads[0].state_dict())
    x = randn(20, 8, I, dtype=torch.float32, grad=False, device=CUDA)
    target = randn(20, 8, 1, dtype=torch.float32, seed=3, grad=False, device=CUDA)
    losses = []
    for model, head in zip((ref, ours), heads):
        params = [*model.parameters(), *head.parameters()]
        opt = torch.optim.SGD(params, lr=0.05)
        scaler = torch.amp.GradScaler("cuda")
        trace = []
        for _ in range(5):
            opt.zero_grad()
            with torch.autocast("cuda", dtype=torch.float16):
                out, _ = model(x)
                loss = torch.nn.functional.mse_loss(head(out).float(), target)
            scaler.scale(loss).backward()
            assert all(p.grad.dtype == torch.float32 for p in model.parameters())
            scaler.step(opt)
            scaler.update()
            trace.append(loss.item())
        losses.append(trace)
    assert losses[1][-1] < losses[1][0]
    torch.testing.assert_close(torch.tensor(losses[1]), torch.tensor(losses[0]), **TOLERANCES[torch.float16])
    for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, **TOLERANCES[torch.float16], msg=lambda m: f"{name}: {m}")
