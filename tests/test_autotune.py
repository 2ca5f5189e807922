"""The cpp backend's CPU paths chosen by measurement (knob cpu_autotune, myrnn_fast.autotune): the
recurrences' (cpu_path) and the gradients' (cpu_grads). The same results as the forced paths, one
cached choice per kind of call, off and forced paths bypassing the cache, and the cache saved and
loaded across processes. Speed is not asserted (bench/ does)."""

import json
import os
import subprocess
import sys
import threading

import pytest
import torch

import myrnn_fast
from myrnn_fast import autotune, config, registry
from parity import TOLERANCES

pytestmark = pytest.mark.skipif(
    registry.unavailable_reason("cpp") is not None, reason=f"cpp: {registry.unavailable_reason('cpp')}"
)


@pytest.fixture(autouse=True)
def empty_cache():
    autotune.clear()
    # The forward's input projection is forced here, so that each test's cache holds the passes the
    # test is about; the tests of that pass take the fixture measured_projection.
    with config.override(cpu_projection="gemm"):
        yield
    autotune.clear()


@pytest.fixture
def measured_projection():
    with config.override(cpu_projection="auto"):
        yield


def _pair(I=6, H=24, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    ref = torch.nn.RNN(I, H, dtype=dtype)
    ours = myrnn_fast.RNN(I, H, dtype=dtype, backend="cpp")
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _step(module, x, grad_out, forward_path=None, backward_path=None, grads_path=None, projection_path=None):
    """Forward and backward (each with its path forced, if given): the output, h_n and the
    gradients of x and of every parameter."""
    x = x.detach().requires_grad_(True)
    for p in module.parameters():
        p.grad = None
    with config.override(**({"cpu_path": forward_path} if forward_path else {}),
                         **({"cpu_projection": projection_path} if projection_path else {})):
        out, h_n = module(x)
    knobs = {**({"cpu_path": backward_path} if backward_path else {}),
             **({"cpu_grads": grads_path} if grads_path else {})}
    with config.override(**knobs):
        out.backward(grad_out)
    return [out.detach(), h_n.detach(), x.grad, *(p.grad for p in module.parameters())]


def _inputs(T, B, I, H, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(T, B, I, generator=g, dtype=dtype), torch.randn(T, B, H, generator=g, dtype=dtype)


def _kinds():
    return {(c["pass"], c["hidden"], c["input"], c["batch_max"], c["steps_max"], c["dtype"]): c["path"]
            for c in autotune.choices()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("B", [1, 3, 40])
def test_the_measured_path_matches_torch_nn_and_is_one_of_the_forced_paths_exactly(dtype, B, measured_projection):
    ref, ours = _pair(dtype=dtype)
    x, grad_out = _inputs(7, B, 6, 24, dtype)
    for path in ("tiles", "gemm"):
        for grads in ("kernels", "gemm"):
            _step(ours, x, grad_out, path, path, grads, grads)
    assert autotune.choices() == []  # a forced path neither measures nor consults the cache
    tuned = _step(ours, x, grad_out)  # first call of its kind: both candidates timed, each pass
    bucket, name = {1: 1, 3: 4, 40: 64}[B], str(dtype).removeprefix("torch.")
    kinds = _kinds()
    passes = ("forward", "backward", "grads+dx", "projection")
    keys = {p: (p, 24, 6 if p in ("grads+dx", "projection") else 0, bucket, 8, name) for p in passes}
    assert set(kinds) == set(keys.values())
    assert kinds[keys["grads+dx"]] in ("kernels", "gemm") and kinds[keys["forward"]] in ("tiles", "gemm")
    assert kinds[keys["projection"]] in ("kernels", "gemm")
    # The results are those of one complete run of each chosen path, to the bit.
    forced = _step(ours, x, grad_out, *(kinds[keys[p]] for p in passes))
    assert all(torch.equal(a, b) for a, b in zip(tuned, forced))
    again = _step(ours, x, grad_out)  # served from the cache: the same paths, the same bits
    assert all(torch.equal(a, b) for a, b in zip(again, tuned))
    for got, expected in zip(tuned, _step(ref, x, grad_out)):
        torch.testing.assert_close(got, expected)


def test_the_gradients_pass_depends_on_whether_x_needs_its_gradient(measured_projection):
    _, ours = _pair()
    x, grad_out = _inputs(5, 3, 6, 24)
    out, _ = ours(x)  # x needs no gradient: pass "grads"
    out.backward(grad_out)
    _step(ours, x, grad_out)  # pass "grads+dx"
    assert {k[0] for k in _kinds()} == {"forward", "backward", "grads", "grads+dx", "projection"}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("B", [1, 40])
def test_the_cell_step_is_measured_once_per_kind_and_matches_its_forced_path(dtype, B):
    torch.manual_seed(0)
    ref = torch.nn.RNNCell(6, 24, dtype=dtype)
    ours = myrnn_fast.RNNCell(6, 24, dtype=dtype, backend="cpp")
    ours.load_state_dict(ref.state_dict())
    x, h = torch.randn(B, 6, dtype=dtype), torch.randn(B, 24, dtype=dtype)
    with torch.no_grad():
        forced = {}
        for path in ("kernels", "gemm"):
            with config.override(cpu_cell=path):
                forced[path] = ours(x, h)
        assert autotune.choices() == []
        tuned = ours(x, h)
        again = ours(x, h)
        expected = ref(x, h)
    [entry] = autotune.choices()
    assert (entry["pass"], entry["hidden"], entry["input"], entry["batch_max"], entry["steps_max"]) == \
        ("cell", 24, 6, {1: 1, 40: 64}[B], 1)
    assert set(entry["times_ms"]) == {"kernels", "gemm"}
    assert torch.equal(tuned, forced[entry["path"]]) and torch.equal(again, tuned)
    torch.testing.assert_close(tuned, expected, **TOLERANCES[dtype])


@pytest.mark.skipif("avx512bf16" not in (myrnn_fast._C.cpu_isas() if registry.unavailable_reason("cpp") is None
                                           else []), reason="needs AVX512-BF16 in this CPU and build")
@pytest.mark.parametrize("B", [1, 5])
def test_bfloat16_products_are_measured_per_kind_and_each_matches_torch_nn(B):
    # With AVX512-BF16 the bfloat16 tiles multiply by vdpbf16ps pairs or by FMAs on float32 copies
    # (knob cpu_bf16_products); under auto the first call of each kind times both.
    ref, ours = _pair()  # torch.nn in float32 on the same bfloat16 values: the better reference
    ours.bfloat16()
    ref.load_state_dict({k: v.float() for k, v in ours.state_dict().items()})
    x, grad_out = (0.5 * t for t in _inputs(7, B, 6, 24))
    x, grad_out = x.bfloat16(), grad_out.bfloat16()
    expected = _step(ref, x.float(), grad_out.float())
    forced = {}
    for products in ("pairs", "float32"):
        with config.override(cpu_bf16_products=products):
            forced[products] = _step(ours, x, grad_out, "tiles", "tiles", "kernels")
        for got, want in zip(forced[products], expected):
            torch.testing.assert_close(got.float(), want.float(), **TOLERANCES[torch.bfloat16])
    assert autotune.choices() == []  # everything forced: nothing measured
    tuned = _step(ours, x, grad_out, "tiles", "tiles", "kernels")
    kinds = {(c["pass"], c["hidden"], c["input"], c["batch_max"], c["steps_max"]): c for c in autotune.choices()}
    bucket = {1: 1, 5: 8}[B]
    assert set(kinds) == {("bf16 forward", 24, 0, bucket, 8), ("bf16 backward", 24, 0, bucket, 8)}
    for entry in kinds.values():
        assert entry["path"] in ("pairs", "float32") and set(entry["times_ms"]) == {"pairs", "float32"}
    # The forward's products decide out and h_n; the backward's, the gradients.
    fwd, bwd = kinds[("bf16 forward", 24, 0, bucket, 8)]["path"], kinds[("bf16 backward", 24, 0, bucket, 8)]["path"]
    assert torch.equal(tuned[0], forced[fwd][0]) and torch.equal(tuned[1], forced[fwd][1])
    if fwd == bwd:
        assert all(torch.equal(a, b) for a, b in zip(tuned, forced[fwd]))
    with config.override(cpu_autotune=0):  # the static choice: float32 copies
        static = _step(ours, x, grad_out, "tiles", "tiles", "kernels")
    assert all(torch.equal(a, b) for a, b in zip(static, forced["float32"]))


def test_one_entry_per_kind_of_call():
    _, ours = _pair()
    with torch.no_grad():
        ours(torch.randn(5, 3, 6))
        assert set(_kinds()) == {("forward", 24, 0, 4, 8, "float32")}
        ours(torch.randn(7, 4, 6))  # another length and batch, in the same power-of-two buckets
        assert len(autotune.choices()) == 1
        ours(torch.randn(1, 3, 6))  # a single step: its own kind
        ours(torch.randn(5, 5, 6))  # the next batch bucket
        ours.double()(torch.randn(5, 3, 6, dtype=torch.float64))
    assert set(_kinds()) == {("forward", 24, 0, 4, 8, "float32"), ("forward", 24, 0, 4, 1, "float32"),
                             ("forward", 24, 0, 8, 8, "float32"), ("forward", 24, 0, 4, 8, "float64")}
    entry = autotune.choices()[0]
    assert entry["threads"] == torch.get_num_threads() and entry["isa"] in myrnn_fast._C.cpu_isas()
    times = entry["times_ms"]
    assert set(times) == {"tiles", "gemm"} and min(times.values()) > 0
    assert entry["path"] == min(times, key=lambda path: (times[path], path != "tiles"))


@pytest.mark.parametrize("static", ["tiles", "gemm"])
def test_autotune_off_restores_the_thresholds_choice(static):
    _, ours = _pair()
    x, grad_out = _inputs(6, 3, 6, 24)
    # H = 24 is under cpu_tiles_max_hidden, and its gradients under cpu_grads_kernels_max_work;
    # thresholds of 0 send every size to gemm.
    grads = "kernels" if static == "tiles" else "gemm"
    limits = {} if static == "tiles" else {"cpu_tiles_max_hidden": 0, "cpu_tiles_max_batch": 0,
                                           "cpu_grads_kernels_max_work": 0}
    with config.override(cpu_path=static, cpu_grads=grads):
        expected = _step(ours, x, grad_out)
    with config.override(cpu_autotune=0, **limits):
        got = _step(ours, x, grad_out)
    assert autotune.choices() == []
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


def test_a_cached_choice_is_used_and_forcing_a_path_ignores_it():
    _, ours = _pair()
    x = torch.randn(5, 3, 6)
    forced = {}
    with torch.no_grad():
        for path in ("tiles", "gemm"):
            with config.override(cpu_path=path):
                forced[path] = ours(x)[0]
        if torch.equal(forced["tiles"], forced["gemm"]):
            pytest.skip("both paths round alike at this shape here: the path taken is not visible")
        for path, other in (("tiles", "gemm"), ("gemm", "tiles")):
            autotune.clear()
            myrnn_fast._C.autotune_record("forward", 24, 0, 4, 8, "float32", torch.get_num_threads(),
                                          myrnn_fast._C.cpu_isas()[-1], path)
            assert torch.equal(ours(x)[0], forced[path])  # the recorded choice, not a new measurement
            with config.override(cpu_path=other):
                assert torch.equal(ours(x)[0], forced[other])
        assert len(autotune.choices()) == 1


def test_threads_measuring_the_same_kind_agree_on_one_choice():
    ref, ours = _pair(H=48)
    x = torch.randn(20, 8, 6)
    with torch.no_grad():
        expected = ref(x)[0]
    results, errors = [], []

    def call():
        try:
            with torch.no_grad():
                results.append(ours(x)[0])
        except Exception as exc:  # noqa: BLE001  (reported below)
            errors.append(exc)

    threads = [threading.Thread(target=call) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 4
    assert len(autotune.choices()) == 1
    for out in results:
        torch.testing.assert_close(out, expected)


def test_save_and_load(tmp_path):
    _, ours = _pair()
    x, grad_out = _inputs(5, 3, 6, 24)
    _step(ours, x, grad_out)
    measured = _kinds()
    path = tmp_path / "sub" / "paths.json"
    assert autotune.save(path) == 3  # forward, backward, grads+dx
    autotune.clear()
    assert autotune.load(path) == 3
    assert _kinds() == measured
    assert all(c["times_ms"] == {} for c in autotune.choices())  # loaded, not timed
    # Another machine's file, a damaged one and a missing one add nothing.
    data = json.loads(path.read_text())
    data["machine"]["cpu"] = "another CPU"
    other = tmp_path / "other.json"
    other.write_text(json.dumps(data))
    (tmp_path / "bad.json").write_text("{not json")
    autotune.clear()
    for name in ("other.json", "bad.json", "missing.json"):
        assert autotune.load(tmp_path / name) == 0
    assert autotune.choices() == []


def test_bad_records_are_value_errors():
    args = {"pass": "forward", "hidden": 8, "input": 0, "batch_max": 4, "steps_max": 16, "dtype": "float32",
            "threads": 1, "isa": "avx2", "path": "tiles"}
    record = myrnn_fast._C.autotune_record
    for change, message in (({"pass": "sideways"}, "pass must be forward, backward, grads, grads[+]dx, cell, bf16 forward, bf16 backward or projection"),
                            ({"path": "blas"}, "path must be tiles or gemm"),
                            ({"pass": "grads", "input": 3}, "path must be kernels or gemm"),
                            ({"pass": "bf16 forward"}, "path must be pairs or float32"),
                            ({"batch_max": 3}, "powers of two"), ({"steps_max": 0}, "powers of two"),
                            ({"input": 3}, "input 0 for the recurrences"),
                            ({"pass": "grads+dx", "path": "kernels"}, ">= 1 for the others"),
                            ({"pass": "cell", "input": 3, "path": "kernels"}, "a cell's steps_max is 1")):
        with pytest.raises(ValueError, match=message):
            record(**{**args, **change})
    assert autotune.choices() == []


def test_the_file_knob_persists_choices_across_processes(tmp_path):
    path = tmp_path / "paths.json"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("MYRNN_")},
           "MYRNN_CPU_AUTOTUNE_FILE": str(path)}
    run = "import torch, myrnn_fast; torch.no_grad()(myrnn_fast.RNN(3, 10, backend='cpp'))(torch.randn(4, 2, 3))"
    done = subprocess.run([sys.executable, "-c", run], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    saved = json.loads(path.read_text())["choices"]
    assert [(c["pass"], c["hidden"], c["batch_max"], c["steps_max"]) for c in saved] == [
        ("forward", 10, 2, 4), ("projection", 10, 2, 4)]
    done = subprocess.run([sys.executable, "-m", "myrnn_fast", "info", "--json"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    listed = json.loads(done.stdout)["autotune"]
    assert [(c["pass"], c["hidden"], c["path"]) for c in listed] == [(c["pass"], 10, c["path"]) for c in saved]
    done = subprocess.run([sys.executable, "-m", "myrnn_fast", "info"], env=env, capture_output=True, text=True,
                          timeout=120)
    assert "forward  H=10 B<=2 T<=4 float32" in done.stdout and "(loaded)" in done.stdout
