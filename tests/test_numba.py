"""The numba backend's own concerns: the disk cache, compile reporting, threads, devices, the
float32 tanh, and the kernel paths the shared parity suite's small shapes do not reach."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import myrnn_fast
from myrnn_fast import registry

if "numba" not in myrnn_fast.available_backends():
    pytest.skip(f"numba backend unavailable: {registry.unavailable_reason('numba')}", allow_module_level=True)

import numba  # noqa: E402

from myrnn_fast import config  # noqa: E402
from myrnn_fast.backends import _numba, _numba_kernels, _torch  # noqa: E402
from parity import assert_close, check_module, randn, rnn_pair  # noqa: E402


@pytest.fixture(scope="module")
def compiled():
    return _numba.warm_up()  # one compile (or cache load) for the whole module


def _child(code: str) -> dict:
    # A fresh process: without this one's settings, which running the backend here may have made.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NUMBA_", "MYRNN_")) and k != "OPENBLAS_NUM_THREADS"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_kernels_are_cached_on_disk(compiled):
    cache = Path(compiled["cache_dir"])
    indexes = list(cache.glob("_numba_kernels.*.nbi"))
    assert indexes, f"no numba cache index in {cache}"
    assert compiled["cache_hits"] + compiled["cache_misses"] == 26  # 13 kernels x 2 dtypes


def test_a_second_process_loads_from_the_cache(compiled):
    info = _child("import json; from myrnn_fast.backends import _numba; print(json.dumps(_numba.warm_up()))")
    assert info["cache_misses"] == 0 and info["cache_hits"] == 26
    assert info["cache_dir"] == compiled["cache_dir"]


def test_info_reports_the_kernels(compiled):
    from myrnn_fast import cli

    info = cli.collect_info()["numba_kernels"]
    assert info is compiled  # warm_up runs once per process
    assert info["seconds"] >= 0 and info["threads"] >= 1


def test_threads_follow_torch():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert _numba._threads(rows=64, work=10**9) == 1
        torch.set_num_threads(2)
        assert _numba._threads(rows=64, work=10**9) == min(2, numba.config.NUMBA_NUM_THREADS)
        assert _numba._threads(rows=64, work=10) == 1  # too little work for a second thread
        assert _numba._threads(rows=5, work=10**9) == 1  # too few rows to split
    finally:
        torch.set_num_threads(before)


def test_importing_changes_no_process_state_until_first_use():
    # The registry imports every backend to ask whether it is usable: only running the numba
    # backend may choose Numba's threading layer, size OpenBLAS's threads or load SciPy's BLAS.
    info = _child(
        """
import json, os, sys, numba, torch
priority = list(numba.config.THREADING_LAYER_PRIORITY)
import myrnn_fast
backends = myrnn_fast.available_backends()
state = lambda: {"OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS"),
                 "scipy.linalg": "scipy.linalg" in sys.modules,
                 "priority": list(numba.config.THREADING_LAYER_PRIORITY)}
before = state()
from myrnn_fast.backends import _numba
_numba.layer(torch.randn(2, 1, 3), torch.zeros(1, 4), torch.randn(4, 3), torch.randn(4, 4), None, None, "tanh")
print(json.dumps({"numba_default": priority, "backends": backends, "before": before, "after": state(),
                  "openmp": "OpenMP" in torch.__config__.parallel_info()}))
"""
    )
    assert "numba" in info["backends"]
    assert info["before"] == {"OPENBLAS_NUM_THREADS": None, "scipy.linalg": False, "priority": info["numba_default"]}
    after = info["after"]
    assert after["OPENBLAS_NUM_THREADS"] == str(config.KNOBS["numba_blas_threads"].default)
    if info["openmp"]:
        assert after["priority"][0] == "omp"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts threads through /proc")
def test_parallel_kernels_share_torchs_openmp_pool(compiled):
    # No second worker pool: a parallel numba launch after torch's pool is up reuses its workers.
    # The first layer call chooses the layer (the backend's first use).
    info = _child(
        """
import json, os, torch
from myrnn_fast.backends import _numba
torch.set_num_threads(2)
a = torch.randn(256, 256); a @ a  # torch's OpenMP pool is up
count = lambda: len(os.listdir("/proc/self/task"))
before = count()
layer_before = _numba._threading_layer()
rows, hidden = 64, 64
_numba.layer(torch.randn(20, rows, 3), torch.zeros(rows, hidden), torch.randn(hidden, 3),
             torch.randn(hidden, hidden), None, None, "tanh")
print(json.dumps({"before": before, "after": count(), "layer_before": layer_before,
                  "layer": _numba._threading_layer(), "openmp": "OpenMP" in torch.__config__.parallel_info()}))
"""
    )
    assert info["layer_before"] is None
    assert info["layer"] is not None, "the parallel kernel did not run"
    if info["openmp"]:
        assert info["layer"] == "omp"
        # A second pool would add a worker per thread (workqueue adds 2 here); sharing libgomp's,
        # Numba adds at most its one launcher thread.
        assert info["after"] - info["before"] < 2


@pytest.mark.parametrize("device", ["meta", "cuda"])
def test_other_devices_name_the_backends_that_run_there(device):
    with pytest.raises(registry.BackendUnavailableError) as exc:
        registry.resolve_backend(device, "numba")
    message = str(exc.value)
    assert f"does not run on {device!r}" in message and "runs on: cpu" in message
    assert "torch" in message.split(f"backends for {device!r}:")[1]


def test_meta_module_raises_the_device_error():
    rnn = myrnn_fast.RNN(3, 4, backend="numba").to("meta")
    with pytest.raises(registry.BackendUnavailableError, match="'meta'"):
        rnn(torch.empty(5, 2, 3, device="meta"))


def test_direct_call_with_a_tensor_on_another_device_raises():
    args = [torch.randn(5, 2, 3), torch.zeros(2, 4), torch.randn(4, 3), torch.randn(4, 4, device="meta")]
    with pytest.raises(RuntimeError, match="CPU tensors only"):
        _numba.layer(*args, None, None, "tanh")


@pytest.mark.parametrize("hidden", [1, 16, 48], ids=["by hand", "one vector", "tiles"])
def test_float32_tanh_within_one_ulp_of_torch(compiled, hidden):
    x = torch.linspace(-12, 12, 200_001, dtype=torch.float32)
    specials = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e-30, 0.2499999, 0.25, 0.2500001])
    x = torch.cat([x, specials, -specials[3:]])
    x = torch.cat([x, torch.zeros(-x.numel() % hidden)])
    # One step, h0 = 0, W_hh = 0: the forward kernel computes tanh(x) alone, H columns a row
    # (H = 1: the scalar columns; 16: one float32 vector a row; 48: the four-row tiles).
    col = x.clone().view(-1, hidden)
    batch_sizes, offsets = _numba._plan([col.shape[0]])
    _numba_kernels.forward_rows(col.numpy(), torch.zeros_like(col).numpy(), torch.zeros(hidden, hidden).numpy(),
                                batch_sizes, offsets, False, 0, col.shape[0], torch.empty_like(col).numpy())
    expected = torch.tanh(x)
    got = col.view(-1)
    assert torch.equal(got.isnan(), expected.isnan())
    finite = ~expected.isnan()
    ulp = torch.finfo(torch.float32).eps / 2  # spacing just below 1
    assert (got[finite] - expected[finite]).abs().max().item() <= max(ulp, 1e-7)
    assert bool((got[finite].abs() <= 1).all())
    assert torch.equal(got[finite].sign(), expected[finite].sign())  # odd, and tanh(+-0) = +-0 in value


def _compare_with_torch_backend(T, B, I, H, batch_sizes, dtype, nonlinearity="tanh"):
    g = torch.Generator().manual_seed(0)
    n = sum(batch_sizes) if batch_sizes else T * B
    x = torch.randn(n, I, generator=g, dtype=dtype) if batch_sizes else torch.randn(T, B, I, generator=g, dtype=dtype)
    h0 = torch.randn(B, H, generator=g, dtype=dtype)
    scale = H**-0.5
    w_ih, w_hh = scale * torch.randn(H, I, generator=g, dtype=dtype), scale * torch.randn(H, H, generator=g, dtype=dtype)
    b_ih, b_hh = scale * torch.randn(H, generator=g, dtype=dtype), scale * torch.randn(H, generator=g, dtype=dtype)
    sizes = None if batch_sizes is None else torch.tensor(batch_sizes)
    leaves = [t.requires_grad_() for t in (x, h0, w_ih, w_hh, b_ih, b_hh)]
    results = []
    for impl in (_numba, _torch):
        out, h_n = impl.layer(x, h0, w_ih, w_hh, b_ih, b_hh, nonlinearity, sizes)
        weights = torch.linspace(-1, 1, out.numel(), dtype=dtype).view_as(out)
        loss = (out * weights).sum() + (h_n * h_n).sum()
        results.append([out, h_n, *torch.autograd.grad(loss, leaves)])
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    names = ["out", "h_n", "grad x", "grad h0", "grad w_ih", "grad w_hh", "grad b_ih", "grad b_hh"]
    for name, a, b in zip(names, *results):
        torch.testing.assert_close(a, b, **tol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("batch_sizes", [None, [8, 8, 6, 5, 5, 3, 1]], ids=["dense", "packed"])
@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
@pytest.mark.parametrize("hidden", [128, 131], ids=["H128", "H131"])  # 131: a step's last elements by hand
def test_gemm_path_matches_the_torch_backend(compiled, dtype, batch_sizes, nonlinearity, hidden):
    assert 128 >= config.get("numba_gemm_min_hidden")
    _compare_with_torch_backend(7, 8, 5, hidden, batch_sizes, dtype, nonlinearity)


@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
@pytest.mark.parametrize("batch_sizes", [None, [16] * 10 + [13] * 5 + [9, 4, 2, 1, 1]], ids=["dense", "packed"])
def test_parallel_path_matches_the_torch_backend(compiled, nonlinearity, batch_sizes):
    T, B, H = 20, 16, 48
    rows = sum(batch_sizes) if batch_sizes else T * B
    if _numba._threads(B, rows * H * H) < 2:
        pytest.skip("a single torch thread here: the parallel path does not run")
    _compare_with_torch_backend(T, B, 3, H, batch_sizes, torch.float64, nonlinearity)


# Several threads with per-step BLAS products: each thread its batch rows, or each its block of
# W_hh's columns (131 columns on 2 threads: a last block padded with a zero column), and auto,
# which measures both on a kind of call's first use.
_SPLIT_KNOBS = dict(numba_parallel_min_work=0, numba_parallel_min_rows=1)


def _split_threads(B, H) -> int:
    with config.override(**_SPLIT_KNOBS):
        return _numba._threads(B, H * H)


@pytest.mark.parametrize("split", ["rows", "columns"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("batch_sizes", [None, [8, 8, 6, 5, 5, 3, 1]], ids=["dense", "packed"])
@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
@pytest.mark.parametrize("hidden", [128, 131], ids=["H128", "H131"])
def test_gemm_split_matches_the_torch_backend(compiled, split, dtype, batch_sizes, nonlinearity, hidden):
    if _split_threads(8, hidden) < 2:
        pytest.skip("a single thread here: the steps are not split")
    _numba.clear_split_choices()
    with config.override(numba_gemm_split=split, **_SPLIT_KNOBS):
        _compare_with_torch_backend(7, 8, 5, hidden, batch_sizes, dtype, nonlinearity)
    assert _numba.split_choices() == []  # a forced split measures nothing


def test_auto_split_measures_each_kind_of_call_once(compiled, monkeypatch):
    if _split_threads(8, 40) < 2:
        pytest.skip("a single thread here: the steps are not split")
    _numba.clear_split_choices()
    runs = {"forward_parallel": 0, "forward_columns": 0, "backward_parallel": 0, "backward_columns": 0}
    for name in runs:
        kernel = getattr(_numba_kernels, name)

        def counted(*args, _kernel=kernel, _name=name):
            runs[_name] += 1
            return _kernel(*args)

        monkeypatch.setattr(_numba_kernels, name, counted)
    with config.override(numba_gemm_split="auto", numba_gemm_min_hidden=32, **_SPLIT_KNOBS):
        for _ in range(3):  # the first call measures, the later ones reuse the choice
            _compare_with_torch_backend(6, 8, 3, 40, None, torch.float64)
        choices = _numba.split_choices()
        assert sorted(c["pass"] for c in choices) == ["backward", "forward"]
        for c in choices:
            assert c["split"] in ("rows", "columns") and set(c["times_ms"]) == {"rows", "columns"}
            assert (c["hidden"], c["batch_max"], c["steps_max"], c["dtype"]) == (40, 8, 8, "float64")
        chosen = {c["pass"]: "parallel" if c["split"] == "rows" else "columns" for c in choices}
        for pass_ in ("forward", "backward"):
            other = "columns" if chosen[pass_] == "parallel" else "parallel"
            # measured twice each, then the choice alone for the two later calls
            assert runs[f"{pass_}_{chosen[pass_]}"] == 2 + 2 and runs[f"{pass_}_{other}"] == 2
        _compare_with_torch_backend(6, 16, 3, 40, None, torch.float64)  # another batch class: measured again
        assert len(_numba.split_choices()) == 4
    _numba.clear_split_choices()


def test_column_split_gradcheck(compiled):
    if _split_threads(4, 5) < 2:
        pytest.skip("a single thread here: the steps are not split")
    leaves = [randn(*shape, seed=i).requires_grad_() for i, shape in enumerate([(5, 4, 3), (4, 5), (5, 3), (5, 5),
                                                                                 (5,), (5,)])]
    with config.override(numba_gemm_split="columns", numba_gemm_min_hidden=4, **_SPLIT_KNOBS):
        for sizes in (None, torch.tensor([4, 3, 3, 1])):
            def fn(x, h0, *weights):
                rows = x if sizes is None else x.reshape(-1, 3)[: int(sizes.sum())]
                return _numba.layer(rows, h0, *weights, "tanh", sizes)

            assert torch.autograd.gradcheck(fn, leaves)


# The vector tiles by rows and columns (float32 vectors hold 16 lanes with AVX-512, else 8;
# float64 half that; the cases cover both widths): four-row tiles of one or two vectors, one-row
# tiles of one or four, and the H % lanes columns by hand,
# with the last four-row block repeating its last row (B % 4 != 0), and packed steps whose row
# counts fall through 4.
_TILE_CASES = [(9, 48), (6, 40), (5, 21), (2, 64), (3, 70), (1, 17), (4, 8)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
@pytest.mark.parametrize("batch_hidden", _TILE_CASES, ids=[f"B{b}-H{h}" for b, h in _TILE_CASES])
def test_vector_tiles_match_the_torch_backend(compiled, batch_hidden, nonlinearity, dtype):
    B, H = batch_hidden
    assert H < config.get("numba_gemm_min_hidden")
    _compare_with_torch_backend(6, B, 3, H, None, dtype, nonlinearity)
    if B > 1:
        sizes = [B, B, max(B - 1, 1), max(B - 3, 1), 1]
        _compare_with_torch_backend(len(sizes), B, 3, H, sizes, dtype, nonlinearity)


def _cell_case(B, I, H, dtype, bias, nonlinearity, seed=0):
    ref = torch.nn.RNNCell(I, H, bias=bias, nonlinearity=nonlinearity, dtype=dtype)
    g = torch.Generator().manual_seed(seed)
    x, h = torch.randn(B, I, generator=g, dtype=dtype), torch.randn(B, H, generator=g, dtype=dtype)
    p = ref._parameters
    return ref, x, h, (p["weight_ih"], p["weight_hh"], p["bias_ih"], p["bias_hh"], nonlinearity)


@pytest.mark.parametrize("path", ["kernel", "gemm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no bias"])
@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
def test_cell_step_matches_torch_rnn_cell(compiled, path, dtype, bias, nonlinearity):
    # Both ways a no-grad step runs: the one kernel (input projection included) and torch's GEMMs.
    ref, x, h, args = _cell_case(5, 7, 33, dtype, bias, nonlinearity)
    threshold = 0 if path == "gemm" else 1 << 30
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    with torch.no_grad(), config.override(numba_cell_gemm_min_work=threshold):
        expected = ref(x, h)
        torch.testing.assert_close(_numba.cell_step(x, h, *args), expected, **tol)
        # a step taken from a batch-first sequence is a strided view
        seq = torch.stack([x, x + 1], 1)
        torch.testing.assert_close(_numba.cell_step(seq[:, 0], h, *args), expected, **tol)
        torch.testing.assert_close(_numba.cell(x, h, *args), expected, **tol)


@pytest.mark.parametrize("path", ["kernel", "gemm"])
@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
def test_cell_step_propagates_nan_and_inf(compiled, path, nonlinearity):
    # 23 values a row: the gemm path's in-place activation runs vectors and a scalar tail.
    ref, x, h, args = _cell_case(3, 4, 23, torch.float32, True, nonlinearity)
    x[0, 0], x[1, 1], h[2, 2] = float("nan"), float("inf"), -float("inf")
    threshold = 0 if path == "gemm" else 1 << 30
    with torch.no_grad(), config.override(numba_cell_gemm_min_work=threshold):
        expected, got = ref(x, h), _numba.cell_step(x, h, *args)
    assert torch.equal(got.isnan(), expected.isnan())
    torch.testing.assert_close(got, expected, equal_nan=True)


def _bad_cell_calls():
    _, x, h, (w_ih, w_hh, b_ih, b_hh, nl) = _cell_case(3, 4, 8, torch.float32, True, "tanh")
    yield "unknown nonlinearity", ValueError, (x, h, w_ih, w_hh, b_ih, b_hh, "gelu")
    yield "x is a list", TypeError, (x.tolist(), h, w_ih, w_hh, b_ih, b_hh, nl)
    yield "h is a list", TypeError, (x, h.tolist(), w_ih, w_hh, b_ih, b_hh, nl)
    yield "integer x", TypeError, (x.long(), h, w_ih, w_hh, b_ih, b_hh, nl)
    yield "float64 h", TypeError, (x, h.double(), w_ih, w_hh, b_ih, b_hh, nl)
    yield "float16 x", TypeError, (x.half(), h.half(), w_ih.half(), w_hh.half(), b_ih.half(), b_hh.half(), nl)
    yield "h on meta", TypeError, (x, h.to("meta"), w_ih, w_hh, b_ih, b_hh, nl)
    yield "w_hh on meta", TypeError, (x, h, w_ih, w_hh.to("meta"), b_ih, b_hh, nl)
    yield "1-D x", ValueError, (x[0], h, w_ih, w_hh, b_ih, b_hh, nl)
    yield "batch differs", ValueError, (x, h[:2], w_ih, w_hh, b_ih, b_hh, nl)
    yield "input size differs", ValueError, (x[:, :3], h, w_ih, w_hh, b_ih, b_hh, nl)
    yield "hidden size differs", ValueError, (x, h[:, :5], w_ih, w_hh, b_ih, b_hh, nl)
    yield "w_hh not square", ValueError, (x, h, w_ih, w_hh[:, :5], b_ih, b_hh, nl)
    yield "w_hh 1-D", ValueError, (x, h, w_ih, w_hh[0], b_ih, b_hh, nl)
    yield "short bias", ValueError, (x, h, w_ih, w_hh, b_ih[:1], b_hh, nl)
    yield "one bias", ValueError, (x, h, w_ih, w_hh, b_ih, None, nl)


@pytest.mark.parametrize("path", ["kernel", "gemm"])
@pytest.mark.parametrize("case", list(_bad_cell_calls()), ids=lambda c: c[0] if isinstance(c, tuple) else "")
def test_cell_step_refuses_bad_arguments(compiled, path, case):
    # The kernel reads raw addresses: anything it could misread must be refused before it runs,
    # with an exception RNNCell treats as "take the checked path".
    _, error, args = case
    threshold = 0 if path == "gemm" else 1 << 30
    with torch.no_grad(), config.override(numba_cell_gemm_min_work=threshold), pytest.raises(error):
        _numba.cell_step(*args)


# ---- the module's one-call route (_numba.stack): one dense layer, one direction ------------


@pytest.fixture
def kernel_calls(monkeypatch):
    """How often each of the one-call route's kernels ran."""
    counts = {}
    for name in ("layer_forward", "layer_forward_parallel", "layer_backward"):
        kernel = getattr(_numba_kernels, name)

        def counted(*args, _kernel=kernel, _name=name):
            counts[_name] = counts.get(_name, 0) + 1
            return _kernel(*args)

        monkeypatch.setattr(_numba_kernels, name, counted)
    return counts


def _one_layer_case(dtype, nonlinearity="tanh", bias=True, batch_first=False, T=5, B=6, I=3, H=20):
    # H = 20: one or two float32 vectors (AVX-512 or not) and four columns by hand, for the
    # recurrence and the input projection alike; B = 6: a four-row tile, then one that repeats
    # its last row.
    ref, ours = rnn_pair("numba", I, H, nonlinearity=nonlinearity, bias=bias, batch_first=batch_first, dtype=dtype)

    def make_inputs():
        x = randn(*((B, T, I) if batch_first else (T, B, I)), dtype=dtype, seed=1)
        h = randn(1, B, H, dtype=dtype, seed=2)
        return (x, h), [x, h]

    return ref, ours, make_inputs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no bias"])
@pytest.mark.parametrize("batch_first", [False, True], ids=["T first", "batch first"])
def test_one_call_route_matches_torch_nn(compiled, kernel_calls, dtype, nonlinearity, bias, batch_first):
    ref, ours, make_inputs = _one_layer_case(dtype, nonlinearity, bias, batch_first)
    out, _ = check_module(ref, ours, make_inputs, dtype)
    assert out.grad_fn.name() == ("TransposeBackward0" if batch_first else "_FusedBackward")
    assert kernel_calls == {"layer_forward": 1, "layer_backward": 1}


def test_one_call_route_without_grad(compiled, kernel_calls):
    ref, ours, make_inputs = _one_layer_case(torch.float64)
    (x, h), _ = make_inputs()
    with torch.no_grad():
        out, h_n = ours(x, h)
        expected, expected_h_n = ref(x, h)
    assert out.grad_fn is None and kernel_calls == {"layer_forward": 1}
    assert_close(out, expected, torch.float64, "out")
    assert_close(h_n, expected_h_n, torch.float64, "h_n")


def test_one_call_forward_with_the_gradients_as_gemms(compiled, kernel_calls):
    # Projection (T B I H = 1800) within the knob, the gradients' work (T B H (2 I + H) = 15600)
    # above it: the backward takes the dz kernels and torch's GEMMs.
    ref, ours, make_inputs = _one_layer_case(torch.float64)
    with config.override(numba_fused_max_work=2000):
        out, _ = check_module(ref, ours, make_inputs, torch.float64)
    assert out.grad_fn.name() == "_FusedBackward"
    assert kernel_calls == {"layer_forward": 1}


def test_one_call_forward_in_parallel(compiled, kernel_calls):
    ref, ours, make_inputs = _one_layer_case(torch.float64, B=16)
    with config.override(numba_parallel_min_work=0):
        if _numba._threads(16, 1) < 2:
            pytest.skip("a single torch thread here: the parallel kernel does not run")
        out, _ = check_module(ref, ours, make_inputs, torch.float64)
    assert out.grad_fn.name() == "_FusedBackward"
    assert kernel_calls == {"layer_forward_parallel": 1}  # the backward's dz on threads: no one-call backward


def test_one_call_route_gradcheck(compiled, kernel_calls):
    torch.manual_seed(0)
    rnn = myrnn_fast.RNN(2, 3, dtype=torch.float64, backend="numba")
    names = [n for n, _ in rnn.named_parameters()]

    def fn(x, hx, *params):
        return torch.func.functional_call(rnn, dict(zip(names, params)), (x, hx))

    inputs = (randn(4, 3, 2, seed=8), randn(1, 3, 3, seed=9), *rnn.parameters())
    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)  # create_graph: the torch backend's formulas
    assert kernel_calls.get("layer_backward", 0) > 0


@pytest.mark.parametrize("case", ["knob off", "two layers", "bidirectional", "strided weight"])
def test_other_calls_take_the_loop_over_layer(compiled, kernel_calls, case):
    kwargs = {"two layers": dict(num_layers=2), "bidirectional": dict(bidirectional=True)}.get(case, {})
    ref, ours = rnn_pair("numba", 3, 8, **kwargs)
    if case == "strided weight":
        ours.weight_hh_l0 = torch.nn.Parameter(ours.weight_hh_l0.detach().t().contiguous().t())
    hx = randn(ours.num_layers * (2 if ours.bidirectional else 1), 4, 8, seed=2)

    def make_inputs():
        x, h = randn(5, 4, 3, seed=1), hx.detach().clone().requires_grad_()
        return (x, h), [x, h]

    with config.override(numba_fused_max_work=0 if case == "knob off" else 1 << 19):
        out, _ = check_module(ref, ours, make_inputs, torch.float64)
    assert out.grad_fn.name() != "_FusedBackward" and not kernel_calls


def test_one_call_route_refuses_a_weight_of_the_wrong_shape(compiled, kernel_calls):
    ours = myrnn_fast.RNN(3, 8, backend="numba")
    ours.weight_hh_l0 = torch.nn.Parameter(torch.zeros(8, 4))  # the kernel would read past it
    with pytest.raises(RuntimeError, match=r"w_hh must be \[H, H\]"):
        ours(torch.zeros(5, 2, 3))
    assert not kernel_calls
