"""The cpp backend's CPU path chosen by measurement (knob cpu_autotune, myrnn_fast.autotune): the same
results as either forced path, one cached choice per kind of call, off and forced paths bypassing
the cache, and the cache saved and loaded across processes. Speed is not asserted (bench/ does)."""

import json
import os
import subprocess
import sys
import threading

import pytest
import torch

import myrnn_fast
from myrnn_fast import autotune, config, registry

pytestmark = pytest.mark.skipif(
    registry.unavailable_reason("cpp") is not None, reason=f"cpp: {registry.unavailable_reason('cpp')}"
)


@pytest.fixture(autouse=True)
def empty_cache():
    autotune.clear()
    yield
    autotune.clear()


def _pair(I=6, H=24, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    ref = torch.nn.RNN(I, H, dtype=dtype)
    ours = myrnn_fast.RNN(I, H, dtype=dtype, backend="cpp")
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _step(module, x, grad_out, forward_path=None, backward_path=None):
    """Forward and backward (each with its path forced, if given): the output, h_n and the
    gradients of x and of every parameter."""
    x = x.detach().requires_grad_(True)
    for p in module.parameters():
        p.grad = None
    with config.override(**({"cpu_path": forward_path} if forward_path else {})):
        out, h_n = module(x)
    with config.override(**({"cpu_path": backward_path} if backward_path else {})):
        out.backward(grad_out)
    return [out.detach(), h_n.detach(), x.grad, *(p.grad for p in module.parameters())]


def _inputs(T, B, I, H, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(T, B, I, generator=g, dtype=dtype), torch.randn(T, B, H, generator=g, dtype=dtype)


def _kinds():
    return {(c["hidden"], c["batch_max"], c["dtype"], c["pass"]): c["path"] for c in autotune.choices()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("B", [1, 3, 40])
def test_the_measured_path_matches_torch_nn_and_is_one_of_the_forced_paths_exactly(dtype, B):
    ref, ours = _pair(dtype=dtype)
    x, grad_out = _inputs(7, B, 6, 24, dtype)
    for path in ("tiles", "gemm"):
        _step(ours, x, grad_out, path, path)
    assert autotune.choices() == []  # a forced path neither measures nor consults the cache
    tuned = _step(ours, x, grad_out)  # first call of its kind: both paths timed
    bucket, name = {1: 1, 3: 4, 40: 64}[B], str(dtype).removeprefix("torch.")
    kinds = _kinds()
    assert set(kinds) == {(24, bucket, name, p) for p in ("forward", "backward")}
    # The results are those of one complete run of each chosen path, to the bit.
    forced = _step(ours, x, grad_out, kinds[24, bucket, name, "forward"], kinds[24, bucket, name, "backward"])
    assert all(torch.equal(a, b) for a, b in zip(tuned, forced))
    again = _step(ours, x, grad_out)  # served from the cache: the same path, the same bits
    assert all(torch.equal(a, b) for a, b in zip(again, tuned))
    for got, expected in zip(tuned, _step(ref, x, grad_out)):
        torch.testing.assert_close(got, expected)


def test_one_entry_per_kind_of_call():
    _, ours = _pair()
    with torch.no_grad():
        ours(torch.randn(5, 3, 6))
        assert set(_kinds()) == {(24, 4, "float32", "forward")}
        ours(torch.randn(9, 4, 6))  # another length, a batch in the same power-of-two bucket
        ours(torch.randn(1, 3, 6))
        assert len(autotune.choices()) == 1
        ours(torch.randn(5, 5, 6))  # the next bucket
        ours.double()(torch.randn(5, 3, 6, dtype=torch.float64))
    assert set(_kinds()) == {(24, 4, "float32", "forward"), (24, 8, "float32", "forward"),
                             (24, 4, "float64", "forward")}
    entry = autotune.choices()[0]
    assert entry["threads"] == torch.get_num_threads() and entry["isa"] in myrnn_fast._C.cpu_isas()
    assert entry["path"] in ("tiles", "gemm") and entry["tiles_ms"] > 0 and entry["gemm_ms"] > 0
    assert entry["path"] == ("tiles" if entry["tiles_ms"] <= entry["gemm_ms"] else "gemm")


@pytest.mark.parametrize("static", ["tiles", "gemm"])
def test_autotune_off_restores_the_thresholds_choice(static):
    _, ours = _pair()
    x, grad_out = _inputs(6, 3, 6, 24)
    # H = 24 is under cpu_tiles_max_hidden; thresholds of 0 send every size to gemm.
    limits = {} if static == "tiles" else {"cpu_tiles_max_hidden": 0, "cpu_tiles_max_batch": 0}
    with config.override(cpu_path=static):
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
            myrnn_fast._C.autotune_record(24, 4, "float32", torch.get_num_threads(),
                                          myrnn_fast._C.cpu_isas()[-1], "forward", path)
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
    assert autotune.save(path) == 2
    autotune.clear()
    assert autotune.load(path) == 2
    assert _kinds() == measured
    assert all(c["tiles_ms"] == 0 and c["gemm_ms"] == 0 for c in autotune.choices())  # loaded, not timed
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
    args = dict(hidden=8, batch_max=4, dtype="float32", threads=1, isa="avx2", path="tiles")
    with pytest.raises(ValueError, match="pass must be forward or backward"):
        myrnn_fast._C.autotune_record(**args, **{"pass": "sideways"})
    with pytest.raises(ValueError, match="path must be tiles or gemm"):
        myrnn_fast._C.autotune_record(**{**args, "path": "blas"}, **{"pass": "forward"})
    with pytest.raises(ValueError, match="power of two"):
        myrnn_fast._C.autotune_record(**{**args, "batch_max": 3}, **{"pass": "forward"})
    assert autotune.choices() == []


def test_the_file_knob_persists_choices_across_processes(tmp_path):
    path = tmp_path / "paths.json"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("MYRNN_")},
           "MYRNN_CPU_AUTOTUNE_FILE": str(path)}
    run = "import torch, myrnn_fast; torch.no_grad()(myrnn_fast.RNN(3, 10, backend='cpp'))(torch.randn(4, 2, 3))"
    done = subprocess.run([sys.executable, "-c", run], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    saved = json.loads(path.read_text())["choices"]
    assert [(c["hidden"], c["batch_max"], c["pass"]) for c in saved] == [(10, 2, "forward")]
    done = subprocess.run([sys.executable, "-m", "myrnn_fast", "info", "--json"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    listed = json.loads(done.stdout)["autotune"]
    assert [(c["hidden"], c["path"]) for c in listed] == [(10, saved[0]["path"])]
    done = subprocess.run([sys.executable, "-m", "myrnn_fast", "info"], env=env, capture_output=True, text=True,
                          timeout=120)
    assert "H=10 B<=2 float32" in done.stdout and "(loaded)" in done.stdout
