"""Mixed precision, every backend, against torch.nn with the same weights: torch.autocast on the
CPU (bfloat16, and float16, which torch also allows there) and modules converted with .half() /
.bfloat16(). Outputs, h_n and the gradients of the input, h0 and every parameter are compared
within parity.TOLERANCES of the reduced dtype, and every returned tensor's dtype must be
torch.nn's. (CUDA autocast and GradScaler: test_cuda.py.)"""

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import myrnn_fast
from parity import TOLERANCES, cell_pair, check_module, randn, rnn_pair

REDUCED = [torch.bfloat16, torch.float16]
DTYPE_ID = {torch.bfloat16: "bf16", torch.float16: "f16", torch.float32: "f32"}
ids = DTYPE_ID.get


def autocast(dtype):
    return torch.autocast("cpu", dtype=dtype)


def under_autocast(dtype):
    def call(module, inputs):
        with autocast(dtype):
            return module(*inputs)

    return call


RNN_CONFIGS = {
    "2 layers bidirectional": dict(num_layers=2, bidirectional=True),
    "relu batch_first": dict(nonlinearity="relu", batch_first=True),
    "no bias": dict(bias=False),
}


@pytest.mark.parametrize("hx_dtype", [None, torch.float32, torch.bfloat16], ids=lambda d: f"hx {ids(d)}")
@pytest.mark.parametrize("config", list(RNN_CONFIGS))
@pytest.mark.parametrize("dtype", REDUCED, ids=ids)
def test_rnn_under_autocast_matches_torch(backend, dtype, config, hx_dtype):
    kwargs = RNN_CONFIGS[config]
    ref, ours = rnn_pair(backend, 3, 6, dtype=torch.float32, **kwargs)
    layers = kwargs.get("num_layers", 1) * (2 if kwargs.get("bidirectional") else 1)

    def make_inputs():
        x = randn(4, 4, 3, dtype=torch.float32, seed=1)  # T = B: batch_first or not
        if hx_dtype is None:
            return (x,), [x]
        h0 = randn(layers, 4, 6, dtype=hx_dtype, seed=2)
        return (x, h0), [x, h0]

    out, h_n = check_module(ref, ours, make_inputs, dtype, call=under_autocast(dtype))
    assert out.dtype == h_n.dtype == dtype
    assert all(p.grad is None and p.dtype == torch.float32 for p in ours.parameters())


@pytest.mark.parametrize("dtype", REDUCED, ids=ids)
def test_packed_rnn_under_autocast_matches_torch(backend, dtype):
    ref, ours = rnn_pair(backend, 3, 6, dtype=torch.float32, bidirectional=True)
    lengths = torch.tensor([2, 5, 3, 4])

    def make_inputs():
        x = randn(5, 4, 3, dtype=torch.float32, seed=1)
        return (pack_padded_sequence(x, lengths, enforce_sorted=False),), [x]

    out, h_n = check_module(ref, ours, make_inputs, dtype, call=under_autocast(dtype))
    assert out.data.dtype == h_n.dtype == dtype


@pytest.mark.parametrize("dtype", REDUCED, ids=ids)
@pytest.mark.parametrize("unbatched", [False, True], ids=["batched", "unbatched"])
@pytest.mark.parametrize("with_hx", [False, True], ids=["no hx", "hx"])
@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
def test_cell_under_autocast_matches_torch(backend, dtype, unbatched, with_hx, nonlinearity):
    ref, ours = cell_pair(backend, 3, 6, dtype=torch.float32, nonlinearity=nonlinearity)
    shape = () if unbatched else (4,)

    def make_inputs():
        x = randn(*shape, 3, dtype=torch.float32, seed=1)
        if not with_hx:
            return (x,), [x]
        hx = randn(*shape, 6, dtype=torch.float32, seed=2)
        return (x, hx), [x, hx]

    (h,) = check_module(ref, ours, make_inputs, dtype, call=under_autocast(dtype))
    assert h.dtype == dtype


@pytest.mark.parametrize("dtype", REDUCED, ids=ids)
@pytest.mark.parametrize("x_dtype, hx_dtype", [("low", torch.float32), (torch.float32, "low")], ids=["x low", "hx low"])
@pytest.mark.parametrize("module", ["RNN", "RNNCell"])
def test_mixed_input_dtypes_under_autocast_give_torchs_dtype(backend, dtype, x_dtype, hx_dtype, module):
    x_dtype = dtype if x_dtype == "low" else x_dtype
    hx_dtype = dtype if hx_dtype == "low" else hx_dtype
    pair = rnn_pair if module == "RNN" else cell_pair
    ref, ours = pair(backend, 3, 4, dtype=torch.float32)
    hx_shape = (1, 2, 4) if module == "RNN" else (2, 4)
    x = randn(*((5,) if module == "RNN" else ()), 2, 3, dtype=x_dtype, grad=False)
    hx = randn(*hx_shape, dtype=hx_dtype, grad=False, seed=1)
    with autocast(dtype):
        expected, actual = ref(x, hx), ours(x, hx)
    expected = expected if isinstance(expected, tuple) else (expected,)
    actual = actual if isinstance(actual, tuple) else (actual,)
    for a, b in zip(actual, expected):
        assert a.dtype == b.dtype == dtype
        torch.testing.assert_close(a, b, **TOLERANCES[dtype])


@pytest.mark.parametrize("module", ["RNN", "RNNCell"])
def test_no_grad_under_autocast_gives_torchs_dtype(backend, module):
    # The no-grad fast paths must not skip autocast's casts (a float32 result would be silent).
    pair = rnn_pair if module == "RNN" else cell_pair
    ref, ours = pair(backend, 3, 4, dtype=torch.float32)
    x = randn(*((5,) if module == "RNN" else ()), 2, 3, dtype=torch.float32, grad=False)
    hx = torch.zeros((1, 2, 4) if module == "RNN" else (2, 4))
    with torch.no_grad(), autocast(torch.bfloat16):
        expected, actual = ref(x, hx), ours(x, hx)
    expected = expected if isinstance(expected, tuple) else (expected,)
    actual = actual if isinstance(actual, tuple) else (actual,)
    for a, b in zip(actual, expected):
        assert a.dtype == b.dtype == torch.bfloat16
        torch.testing.assert_close(a, b, **TOLERANCES[torch.bfloat16])


@pytest.mark.parametrize("module", ["RNN", "RNNCell"])
def test_float64_input_under_autocast_fails_like_torch(backend, module):
    # Autocast leaves float64 alone and casts the float32 weights: a dtype mismatch, as in torch.nn.
    pair = rnn_pair if module == "RNN" else cell_pair
    ref, ours = pair(backend, 3, 4, dtype=torch.float32)
    x = randn(*((5,) if module == "RNN" else ()), 2, 3, dtype=torch.float64, grad=False)
    with autocast(torch.bfloat16):
        with pytest.raises(RuntimeError) as expected:
            ref(x)
        with pytest.raises(RuntimeError) as actual:
            ours(x)
    assert str(actual.value) == str(expected.value)


def test_autocast_disabled_inside_changes_nothing(backend):
    # An inner autocast(enabled=False) region runs in the inputs' own dtype, as torch.nn does.
    ref, ours = rnn_pair(backend, 3, 4, dtype=torch.float32)
    x = randn(5, 2, 3, dtype=torch.float32, grad=False)
    with autocast(torch.bfloat16), torch.autocast("cpu", enabled=False):
        out, h_n = ours(x)
        expected, _ = ref(x)
    assert out.dtype == h_n.dtype == expected.dtype == torch.float32
    torch.testing.assert_close(out, expected, **TOLERANCES[torch.float32])


# ---- modules converted to float16 / bfloat16 ------------------------------------------------


@pytest.mark.parametrize("dtype", REDUCED, ids=ids)
@pytest.mark.parametrize("config", list(RNN_CONFIGS))
def test_reduced_precision_rnn_matches_torch(backend, dtype, config):
    ref, ours = rnn_pair(backend, 3, 6, dtype=torch.float32, **RNN_CONFIGS[config])
    ref.to(dtype), ours.to(dtype)

    def make_inputs():
        x = randn(4, 4, 3, dtype=dtype, seed=1)  # T = B: batch_first or not
        return (x,), [x]

    out, h_n = check_module(ref, ours, make_inputs, dtype)
    assert out.dtype == h_n.dtype == dtype
    assert all(p.grad is None and p.dtype == dtype for p in ours.parameters())


@pytest.mark.parametrize("dtype", REDUCED, ids=ids)
@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
def test_reduced_precision_cell_matches_torch(backend, dtype, nonlinearity):
    ref, ours = cell_pair(backend, 3, 6, dtype=dtype, nonlinearity=nonlinearity)

    def make_inputs():
        x, hx = randn(4, 3, dtype=dtype, seed=1), randn(4, 6, dtype=dtype, seed=2)
        return (x, hx), [x, hx]

    (h,) = check_module(ref, ours, make_inputs, dtype)
    assert h.dtype == dtype


# ---- the cpp backend: native 16-bit kernels, and the op's own Autocast kernels --------------


def _cpp():
    if "cpp" not in myrnn_fast.available_backends():
        pytest.skip("the cpp backend is not available")


@pytest.mark.parametrize("dtype", REDUCED, ids=ids)
@pytest.mark.parametrize("path", ["tiles", "gemm"])
@pytest.mark.parametrize("hidden", [1, 7, 40], ids=lambda h: f"H{h}")
def test_cpp_kernels_in_16_bits_match_torch_on_every_isa(dtype, path, hidden):
    # Every compiled instruction set, both paths, and hidden sizes with and without a scalar tail.
    _cpp()
    from myrnn_fast import _C, config

    for isa in _C.cpu_isas():
        with config.override(cpu_isa=isa, cpu_path=path):
            ref, ours = rnn_pair("cpp", 1, hidden, dtype=dtype, seed=3)

            def make_inputs():
                x = randn(6, 5, 1, dtype=dtype, seed=1)
                return (x,), [x]

            check_module(ref, ours, make_inputs, dtype)


@pytest.mark.parametrize("dtype", REDUCED, ids=ids)
def test_cpp_packed_16_bit_rows_split_over_threads_match_torch_on_every_isa(dtype):
    # Packed lengths (rows ending at different steps) with the batch split between threads: each
    # thread's rows start past row 0, where the kernels' per-row float state must line up.
    _cpp()
    from myrnn_fast import _C, config

    lengths = torch.tensor([7, 7, 6, 4, 4, 3, 2, 1, 1])
    for isa in _C.cpu_isas():
        with config.override(cpu_isa=isa, cpu_path="tiles", cpu_parallel_min_work=0):
            ref, ours = rnn_pair("cpp", 3, 21, dtype=dtype, seed=5, bidirectional=True)

            def make_inputs():
                x = randn(7, 9, 3, dtype=dtype, seed=1)
                return (pack_padded_sequence(x, lengths),), [x]

            check_module(ref, ours, make_inputs, dtype)


@pytest.mark.parametrize("dtype", REDUCED, ids=ids)
@pytest.mark.parametrize("sizes", [(2, 1, 32), (3, 40, 37), (5, 70, 64)], ids=lambda s: "B{}-I{}-H{}".format(*s))
def test_cpp_cell_in_16_bits_matches_torch_on_every_isa(dtype, sizes):
    # The small-cell dot products: whole vectors (32 values with AVX512-BF16) and masked tails.
    _cpp()
    from myrnn_fast import _C, config

    B, I, H = sizes
    for isa in _C.cpu_isas():
        with config.override(cpu_isa=isa):
            ref, ours = cell_pair("cpp", I, H, dtype=dtype, seed=4)

            def make_inputs():
                x, hx = randn(B, I, dtype=dtype, seed=1), randn(B, H, dtype=dtype, seed=2)
                return (x, hx), [x, hx]

            check_module(ref, ours, make_inputs, dtype)
            with torch.no_grad():  # the kernel without the dispatcher
                x, hx = randn(B, I, dtype=dtype, seed=1, grad=False), randn(B, H, dtype=dtype, seed=2, grad=False)
                torch.testing.assert_close(ours(x, hx), ref(x, hx), **TOLERANCES[dtype])


def test_cpp_saves_activations_in_the_storage_dtype():
    # Under autocast the forward saves its bfloat16 tensors, not float32 copies: what halves
    # training memory against float32.
    _cpp()
    _, ours = rnn_pair("cpp", 3, 8, dtype=torch.float32)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    x = randn(5, 2, 3, dtype=torch.float32, seed=1)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast(torch.bfloat16):
        out, _ = ours(x)
    floating = [t for t in saved if t.is_floating_point()]
    assert floating and all(t.dtype == torch.bfloat16 for t in floating), [t.dtype for t in floating]
    assert any(t.shape == out.shape for t in floating)  # the output itself, for the backward


@pytest.mark.parametrize("dtype", REDUCED, ids=ids)
def test_cpp_ops_cast_under_autocast_like_torchs_rnn_ops(dtype):
    _cpp()
    from myrnn_fast import ops
    from parity import layer_args

    args = layer_args(dtype=torch.float32, packed=True)
    x, h0, w_ih, w_hh, b_ih, b_hh, sizes, nonlinearity = args
    with autocast(dtype):
        out, h_n = ops.rnn_forward(*args)
        y = ops.rnn_cell(x[:3], h0, w_ih, w_hh, b_ih, b_hh, nonlinearity)
    assert out.dtype == h_n.dtype == y.dtype == dtype
    low = [t.detach().to(dtype) for t in (x, h0, w_ih, w_hh, b_ih, b_hh)]
    expected = ops.rnn_forward(*low, sizes, nonlinearity)
    torch.testing.assert_close(out, expected[0], rtol=0, atol=0)
    (out.float().square().sum() + y.float().sum()).backward()
    assert all(t.grad.dtype == torch.float32 for t in (x, h0, w_ih, w_hh, b_ih, b_hh))
    with autocast(dtype):  # float64 stays float64
        assert ops.rnn_forward(*layer_args(dtype=torch.float64))[0].dtype == torch.float64


@pytest.mark.parametrize("route", ["compile", "export"])
def test_cpp_under_autocast_compiles_and_exports_like_eager(route):
    # torch.compile(fullgraph=True) and torch.export record the same casts and ops as eager.
    _cpp()
    _, rnn = rnn_pair("cpp", 3, 8, dtype=torch.float32)
    _, cell = cell_pair("cpp", 3, 8, dtype=torch.float32)

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn, self.cell = rnn, cell

        def forward(self, x):
            with autocast(torch.bfloat16):
                out, h_n = self.rnn(x)
                return out, h_n, self.cell(x[0])

    model = Model()
    x = randn(5, 2, 3, dtype=torch.float32, seed=1, grad=False)
    expected = model(x)
    if route == "compile":
        run = torch.compile(model, fullgraph=True, backend="aot_eager")
    else:
        run = torch.export.export(model, (x,)).module()
    actual = run(x)
    # Export records a cell step as ATen's composite cell (myrnn_fast.export), which rounds its
    # pre-activation to bfloat16 before tanh: the cell then agrees to bfloat16's tolerance.
    exact = dict(rtol=0, atol=0)
    tolerances = [exact, exact, exact if route == "compile" else TOLERANCES[torch.bfloat16]]
    for a, b, tol in zip(actual, expected, tolerances):
        assert a.dtype == b.dtype == torch.bfloat16
        torch.testing.assert_close(a, b, **tol)


@pytest.fixture(params=[1, 2], ids=lambda n: f"{n} threads")
def threads(request):
    """ATen's pool at 1 or 2 threads for the test, then as it was."""
    previous = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(previous)


@pytest.mark.parametrize("dtype", REDUCED, ids=ids)
def test_cpp_16_bit_kernel_grads_match_the_gemm_grads_on_every_isa(dtype, threads):
    # The 16-bit kernel gradients widen the rows in chunks (64 rows) and runs of consecutive rows;
    # here 231 packed rows, with sequences ending mid-chunk, odd sizes (vector tails) and, on two
    # threads, each thread's rows past row 0. The GEMM route sums the same float32 products of
    # the same dz: both round each gradient once, so they agree to about a 16-bit ulp.
    _cpp()
    from myrnn_fast import _C, config

    T, I, H = 40, 5, 37
    lengths = torch.tensor([40, 40, 33, 30, 25, 17, 16, 16, 9, 5])
    batch_sizes = torch.tensor([int((lengths > t).sum()) for t in range(T)])
    N = int(batch_sizes.sum())
    g = torch.Generator().manual_seed(7)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    x, h0 = rand(N, I), rand(len(lengths), H)
    w_ih, w_hh, b_ih, b_hh = rand(H, I, scale=0.3), rand(H, H, scale=0.2), rand(H), rand(H)
    grad_out, grad_h_n = rand(N, H), rand(len(lengths), H)
    for isa in _C.cpu_isas():
        with config.override(cpu_isa=isa, cpu_path="tiles", cpu_parallel_min_work=0):
            out, _ = _C.rnn_forward_cpu(x, h0, w_ih, w_hh, b_ih, b_hh, batch_sizes, "tanh")
            results = {}
            for route in ("kernels", "gemm"):
                with config.override(cpu_grads=route):
                    results[route] = _C.rnn_backward_cpu(
                        grad_out, grad_h_n, x, h0, w_ih, w_hh, out, batch_sizes, "tanh", True
                    )
        for name, a, b in zip(("x", "h0", "w_ih", "w_hh", "b"), results["kernels"], results["gemm"]):
            assert a.dtype == dtype and a.shape == b.shape, (isa, name)
            scale = b.float().abs().max().item()
            torch.testing.assert_close(a.float(), b.float(), rtol=2**-6, atol=2**-7 * scale, msg=f"{isa} grad {name}")


@pytest.mark.parametrize("dtype", REDUCED, ids=ids)
def test_cpp_16_bit_kernel_projection_matches_the_gemm_on_every_isa(dtype, threads):
    # The kernels' input projection widens x in chunks of 64 rows (here two and a tail of 22, split
    # over two threads), odd sizes for the vector tails. W_hh = 0 with relu makes the output the
    # rounded projection itself (where positive): both routes round a float32 sum once, so they
    # agree with each other and with float64 to about a 16-bit ulp.
    _cpp()
    from myrnn_fast import _C, config

    T, B, I, H = 50, 3, 37, 21
    g = torch.Generator().manual_seed(3)
    x = torch.randn(T, B, I, generator=g).to(dtype)
    w_ih, b_ih, b_hh = [(torch.randn(*s, generator=g) * 0.3).to(dtype) for s in ((H, I), (H,), (H,))]
    w_hh, h0 = torch.zeros(H, H, dtype=dtype), torch.zeros(B, H, dtype=dtype)
    exact = torch.relu(x.double() @ w_ih.double().T + b_ih.double() + b_hh.double())
    for isa in _C.cpu_isas():
        got = {}
        for route in ("kernels", "gemm"):
            with config.override(cpu_isa=isa, cpu_projection=route, cpu_parallel_min_work=0):
                got[route], _ = _C.rnn_forward_cpu(x, h0, w_ih, w_hh, b_ih, b_hh, None, "relu")
            assert got[route].dtype == dtype, (isa, route)
            torch.testing.assert_close(got[route].double(), exact, rtol=2**-7, atol=2**-8, msg=f"{isa} {route}")
        torch.testing.assert_close(got["kernels"].float(), got["gemm"].float(), rtol=2**-7, atol=2**-8,
                                   msg=f"{isa}: kernels against gemm")
