"""The benchmark machinery (``myrnn_fast.benchmark``, ``myrnn-fast bench``) on a tiny grid.

Speed is never asserted: these check that every implementation is timed on equal terms, that the
report has every row, skip and file it should, and that bad arguments are clear errors.
"""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

import myrnn_fast
from myrnn_fast import cli, registry
from myrnn_fast.benchmark import Grid, peers, report, run, timing, workloads, write

TINY = (3, 2, 2, 4)
WIDE = (2, 5001, 1, 2)  # more row-steps than the reference loop is allowed, yet cheap for the rest
UNAVAILABLE = [name for name in myrnn_fast.BACKENDS if name not in myrnn_fast.available_backends()]


def _tiny_grid(**overrides) -> Grid:
    settings = dict(shapes=[TINY, WIDE], budget_s=0.01, min_rounds=2, max_rounds=3,
                    reference_budget_s=0.01, gemm_sizes=(32,))
    return Grid(**{**settings, **overrides})


@pytest.fixture(scope="module")
def result():
    lines = []
    data = run(_tiny_grid(), progress=lines.append)
    data["progress"] = lines  # not part of the report: checked below, dropped before writing
    return data


def _key(row):
    return tuple(row["shape"][k] for k in "TBIH"), row["pass"], row["backend"]


def test_every_available_backend_and_the_baseline_has_a_row(result):
    rows = {_key(row): row for row in result["results"]}
    assert len(rows) == len(result["results"])  # one row per implementation, shape and pass
    for shape in (TINY, WIDE):
        for pass_ in workloads.PASSES:
            base = rows.pop((shape, pass_, workloads.baseline(pass_)))
            assert base["speedup_vs_torch_nn"] == 1.0
            for backend in myrnn_fast.available_backends():
                if backend == "reference" and shape == WIDE:
                    continue
                row = rows.pop((shape, pass_, backend))
                assert row["speedup_vs_torch_nn"] == pytest.approx(base["median_ms"] / row["median_ms"])
                assert row["timed"] == ("alone" if backend == "reference" else "interleaved")
    assert not rows  # nothing else
    assert result["config"]["backends"] == myrnn_fast.available_backends()


def test_rows_carry_the_design_keys_and_sane_statistics(result):
    for row in result["results"]:
        assert set(row["shape"]) == {"T", "B", "I", "H"}
        assert row["pass"] in ("fwd", "fwd+bwd", "cell")
        assert row["min_ms"] <= row["q1_ms"] <= row["median_ms"] <= row["q3_ms"]
        assert row["iqr_ms"] == pytest.approx(row["q3_ms"] - row["q1_ms"])
        assert 2 <= row["rounds"] and row["calls_per_round"] >= 1
        assert row["gflops"] == pytest.approx(workloads.flops(_key(row)[0], row["pass"]) / row["median_ms"] / 1e6)
        assert row["peak_fraction"] == pytest.approx(row["gflops"] / result["machine"]["gemm_peak"]["gflops"])
        assert row["baseline"] == ("torch.nn.RNNCell" if row["pass"] == "cell" else "torch.nn.RNN")


def test_skips_are_reported_with_reasons(result):
    skipped = result["skipped"]
    for name in UNAVAILABLE:
        entry = next(e for e in skipped if e["backend"] == name)
        assert entry["shape"] is None and registry.unavailable_reason(name) in entry["reason"]
    reference = [e for e in skipped if e["backend"] == "reference"]
    assert {(tuple(e["shape"].values()), e["pass"]) for e in reference} == {(WIDE, p) for p in workloads.PASSES}
    assert all(str(workloads.REFERENCE_MAX_ROW_STEPS) in e["reason"] for e in reference)
    assert "reference loop" in "\n".join(report.skipped_lines(result))


def test_machine_and_progress(result):
    info = result["machine"]
    for key in ("cpu", "logical_cpus", "torch_threads", "torch", "numba", "gpu", "gemm_peak"):
        assert key in info
    assert info["torch"] == torch.__version__ and info["gemm_peak"]["gflops"] > 0
    progress = result["progress"]
    assert progress[0].startswith("machine:")
    groups = [line for line in progress if line.startswith("[")]
    assert len(groups) == 2 * len(workloads.PASSES) + len(workloads.PASSES)  # interleaved + reference blocks
    assert groups[-1].startswith(f"[{len(groups)}/{len(groups)}]")


def test_write_makes_the_three_files(result, tmp_path):
    pytest.importorskip("matplotlib")
    data = {k: v for k, v in result.items() if k != "progress"}
    paths, notes = write(data, tmp_path)
    assert {p.name for p in paths} == {"report.md", "report.json", "speedup.png"} and not notes
    assert (tmp_path / "speedup.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "report.json").read_text()) == json.loads(json.dumps(data))
    text = (tmp_path / "report.md").read_text()
    pasted = text.split(report.START, 1)[1].split(report.END, 1)[0]
    assert pasted.count("\n| 3, 2, 2, 4 |") == len(workloads.PASSES)
    assert pasted.count("skipped") >= len(workloads.PASSES)  # the reference column at WIDE
    assert "![speedup" in text and "## Every measurement" in text


@pytest.mark.parametrize("load, warned", [(None, False), ([0.3, 0.2, 0.1], False), ([1.5, 1.0, 0.5], True)])
def test_a_busy_machine_is_flagged_in_the_pasted_section(result, load, warned):
    data = {**result, "machine": {**result["machine"], "load_average_before": load, "logical_cpus": 2}}
    assert ("**Noisy run:**" in report.pasteable(data)) is warned


def test_write_without_matplotlib_writes_the_other_two(result, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails as if not installed
    data = {k: v for k, v in result.items() if k != "progress"}
    paths, notes = write(data, tmp_path)
    assert {p.name for p in paths} == {"report.md", "report.json"}
    assert "matplotlib" in notes[0] and not (tmp_path / "speedup.png").exists()
    assert "![speedup" not in (tmp_path / "report.md").read_text()


@pytest.mark.parametrize("pass_", workloads.PASSES)
def test_workloads_run_the_same_weights_and_inputs(backend, pass_):
    baseline = workloads.workload(workloads.baseline(pass_), TINY, pass_)
    ours = workloads.workload(backend, TINY, pass_)
    if pass_ == "fwd+bwd":  # returns nothing: the work is the gradients
        assert baseline() is None and ours() is None
        return
    expected, got = baseline(), ours()
    expected, got = (expected[0], got[0]) if pass_ == "fwd" else (expected, got)
    torch.testing.assert_close(got, expected)


def test_flop_counts():
    T, B, I, H = 5, 3, 2, 4
    assert workloads.flops((T, B, I, H), "fwd") == 2 * T * B * H * (I + H)
    assert workloads.flops((T, B, I, H), "cell") == 2 * B * H * (I + H)
    # The backward: the weight gradients, dh through W_hh and dx through W_ih.
    assert workloads.flops((T, B, I, H), "fwd+bwd") == 4 * T * B * H * (I + H) + 2 * T * B * H * (H + I)


def test_interleaved_rounds_follow_budget_bounds():
    calls = {"a": 0, "b": 0}

    def make(name):
        def fn():
            calls[name] += 1
        return fn

    timings = timing.interleaved({"a": make("a"), "b": make("b")}, budget_s=0.0, min_rounds=4, max_rounds=9)
    assert [len(t.samples) for t in timings.values()] == [4, 4]
    timings = timing.interleaved({"a": make("a")}, budget_s=60.0, min_rounds=1, max_rounds=3)
    assert len(timings["a"].samples) == 3 and all(s > 0 for s in timings["a"].samples)


def test_explicit_backends_are_validated():
    with pytest.raises(ValueError, match="valid names"):
        workloads.select_backends(["torch", "cuDNN"], "cpu")
    assert workloads.select_backends(["torch", "torch"], "cpu") == (["torch"], {})


def test_unavailable_backend_is_skipped_by_default_and_an_error_when_named(monkeypatch):
    real = registry.unavailable_reason
    monkeypatch.setattr(registry, "unavailable_reason", lambda n: "not built (test)" if n == "torch" else real(n))
    chosen, skipped = workloads.select_backends(None, "cpu")
    assert "torch" not in chosen and skipped["torch"] == "not available in this install: not built (test)"
    with pytest.raises(myrnn_fast.BackendUnavailableError, match=r"'torch' is not available: not built \(test\)"):
        workloads.select_backends(["reference", "torch"], "cpu")


def test_backend_that_does_not_run_on_the_device_is_skipped_with_the_reason(monkeypatch):
    real = registry.resolve_backend

    def resolve(device, name=None):
        if name == "torch":
            raise registry.BackendUnavailableError("backend 'torch' does not run on 'cpu' tensors (test)")
        return real(device, name)

    monkeypatch.setattr(registry, "resolve_backend", resolve)
    chosen, skipped = workloads.select_backends(None, "cpu")
    assert "torch" not in chosen and "does not run on 'cpu'" in skipped["torch"]
    assert chosen == [n for n in myrnn_fast.available_backends() if n != "torch"]


@pytest.mark.parametrize("args, message", [
    (["--backends", "torch,cuDNN"], "valid names are"),
    (["--backends", ","], "at least one backend"),
    (["--shapes", "1,2,3"], "four positive integers"),
    (["--shapes", "1,2,0,4"], "four positive integers"),
    (["--passes", "fwd,bwd"], "valid passes are"),
    (["--preset", "huge"], "invalid choice"),
    (["--budget", "0"], "positive number of seconds"),
    (["--dtype", "int8"], "invalid choice"),
])
def test_cli_argument_errors(args, message, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["bench", *args])
    assert info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cli_cuda_without_a_gpu_is_a_clear_error(capsys):
    assert cli.main(["bench", "--device", "cuda"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_cli_writes_the_report(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "MYRNN_BACKEND"}
    command = [sys.executable, "-m", "myrnn_fast", "bench", "--shapes", "3,2,2,4", "--passes", "fwd,cell",
               "--budget", "0.01", "--backends", "torch", "--out", str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "| 3, 2, 2, 4 | fwd |" in done.stdout and "| 3, 2, 2, 4 | cell |" in done.stdout
    assert "[2/2]" in done.stderr  # progress: one line per shape and pass
    data = json.loads((tmp_path / "report.json").read_text())
    assert {(r["pass"], r["backend"]) for r in data["results"]} == {
        ("fwd", "torch.nn.RNN"), ("fwd", "torch"), ("cell", "torch.nn.RNNCell"), ("cell", "torch")}
    assert data["config"]["device"] == "cpu" and data["config"]["preset"] is None
    assert (tmp_path / "report.md").exists()


# ---- the torch.mm floor and the peers ----------------------------------------------------------


def test_rows_carry_the_mm_floor_of_their_own_rounds(result):
    for row in result["results"]:
        if row["timed"] == "alone":  # the reference loop runs apart from the floor
            assert row["mm_floor_ms"] is None and row["fraction_of_floor"] is None
            continue
        assert row["mm_floor_ms"] > 0
        assert row["fraction_of_floor"] == pytest.approx(row["mm_floor_ms"] / row["median_ms"])
    floors = {(tuple(r["shape"].values()), r["pass"]): r["mm_floor_ms"] for r in result["results"]
              if r["timed"] == "interleaved"}
    assert set(floors) == {(shape, pass_) for shape in (TINY, WIDE) for pass_ in workloads.PASSES}
    assert "torch.mm floor" in report.summary_table(result)[0]


@pytest.mark.parametrize("pass_", workloads.PASSES)
def test_the_mm_floor_runs_exactly_the_unavoidable_products(pass_):
    T, B, I, H = 4, 3, 2, 5
    shapes = []

    class Count(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is torch.mm:
                shapes.append((tuple(args[0].shape), tuple(args[1].shape)))
            return func(*args, **(kwargs or {}))

    floor = workloads.mm_floor((T, B, I, H), pass_=pass_)
    with Count():
        floor()
    steps = 1 if pass_ == "cell" else T
    N = steps * B
    projection, dw_ih, dw_hh, dx = ((N, I), (I, H)), ((H, N), (N, I)), ((H, N), (N, H)), ((N, H), (H, I))
    expected = [projection, *[((B, H), (H, H))] * steps]
    if pass_ == "fwd+bwd":
        expected += [*[((B, H), (H, H))] * T, dw_ih, dw_hh, dx]
    assert sorted(shapes) == sorted(expected)


PEERS_HERE = [p for p in peers.PEERS if peers.unavailable_reason(p, "cpu") is None]


@pytest.fixture(scope="module")
def peer_result():
    if not PEERS_HERE:
        pytest.skip("no peer is installed (pip install 'myrnn_fast[peers]')")
    return run(_tiny_grid(shapes=[TINY]), backends=["torch"], peers=[*PEERS_HERE, "compile"])


def test_installed_peers_are_checked_then_timed_in_the_same_rounds_or_alone(peer_result):
    rows = {(r["pass"], r["backend"]): r for r in peer_result["results"]}
    assert peer_result["config"]["peers"] == PEERS_HERE  # "compile" named torch.compile, once
    for name in PEERS_HERE:
        for pass_ in workloads.PASSES:
            reason = peers.skip_reason(name, TINY, pass_)
            if reason is not None:
                assert (pass_, name) not in rows
                assert any(e["backend"] == name and e["pass"] == pass_ and e["reason"] == reason
                           for e in peer_result["skipped"])
                continue
            row = rows[pass_, name]
            alone = name in peers.ALONE  # JAX: its spinning thread pool would slow the others
            assert row["peer"] and row["timed"] == ("alone" if alone else "interleaved")
            assert row["error_vs_torch_nn"] <= 1e-3
            base = rows[pass_, "torch.nn.RNN"]
            assert row["speedup_vs_torch_nn"] == pytest.approx(base["median_ms"] / row["median_ms"])
            if not alone:
                assert row["rounds"] == base["rounds"]  # the same interleaved rounds
            assert (row["compile_s"] is not None) == (name == "torch.compile")
    assert ("fwd", "torch") in rows and not rows["fwd", "torch"]["peer"]
    header = report.summary_table(peer_result)[0]
    assert all(f"`{name}` (peer)" in header for name in PEERS_HERE)
    if "torch.compile" in PEERS_HERE:
        assert "compiling included" in "\n".join(report.compile_lines(peer_result))
    assert "onnxruntime" not in PEERS_HERE or ("fwd+bwd", "onnxruntime") not in rows


@pytest.mark.parametrize("peer", PEERS_HERE)
def test_each_peer_computes_what_torch_nn_does(peer):
    for pass_ in peers.PASSES:
        if peers.skip_reason(peer, TINY, pass_) is None:
            assert peers.build(peer, TINY, pass_).error < 1e-5


def test_a_peer_that_disagrees_is_reported_not_timed(monkeypatch):
    monkeypatch.setattr(peers, "_relative_error", lambda got, expected: 0.5)
    data = run(_tiny_grid(shapes=[TINY], passes=["fwd"]), backends=["torch"], peers=["torch.compile"])
    assert not [r for r in data["results"] if r["backend"] == "torch.compile"]
    entry = next(e for e in data["skipped"] if e["backend"] == "torch.compile")
    assert "disagrees with torch.nn" in entry["reason"] and "5.00e-01" in entry["reason"]
    assert "| skipped |" in report.summary_table(data)[2]


def test_a_peer_not_installed_is_skipped_with_its_reason(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "jax" else real(name, *a))
    assert "jax not installed" in peers.unavailable_reason("jax", "cpu")
    data = run(_tiny_grid(shapes=[TINY], passes=["fwd"]), backends=["torch"], peers=["jax"])
    assert data["config"]["peers"] == []
    assert data["skipped"] == [{"backend": "jax", "shape": None, "pass": None,
                                "reason": "jax not installed (pip install 'myrnn_fast[peers]')"}]


def test_cli_rejects_an_unknown_peer(capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "--peers", "jax,tensorflow"])
    assert "unknown peer 'tensorflow'; valid peers are: jax, onnxruntime, torch.compile" in capsys.readouterr().err


@pytest.mark.parametrize("routes, bound", [(("tiles", "kernels"), 0.75), (("gemm", "gemm"), 0.9)], ids=["kernels", "gemm"])
def test_a_bfloat16_training_step_needs_well_under_float32s_peak_memory(monkeypatch, routes, bound):
    # The saved activations, the backward's scratch and the gradients stay in the storage dtype:
    # at this shape they are most of a step's peak (out alone is 16 MB in float32). The routes are
    # forced (the children inherit the environment): a first call under autotuning runs both
    # candidates of each pass, whose buffers then make the peak of each fresh process vary by
    # tens of MB (float32 101-148 MB, bfloat16 57-80 MB over a few runs), more than the saving
    # measured. Forced, the peaks repeat: 35 and 23 MB by the kernels, 40 and 30 by the GEMMs.
    if registry.unavailable_reason("cpp") is not None:
        pytest.skip(registry.unavailable_reason("cpp"))
    from myrnn_fast.benchmark import memory

    path, route = routes
    if route == "gemm" and "AVX512" not in torch.backends.cpu.get_cpu_capability():
        # Without AVX-512 (avx512_core), oneDNN has no bfloat16 GEMM and ATen's fallback loop is
        # an order of magnitude slower, so the op's GEMMs take float32 copies of their operands
        # (rnn_cpu.cpp, slow_gemm): on a 2-core AVX2 EPYC that step peaked at 54.5 MB against
        # float32's 38.1. The kernels' route, above, keeps its saving there.
        pytest.skip("no AVX-512 here: the bfloat16 GEMMs run on float32 copies")
    monkeypatch.setenv("MYRNN_CPU_PATH", path)
    monkeypatch.setenv("MYRNN_CPU_GRADS", route)
    monkeypatch.setenv("MYRNN_CPU_PROJECTION", route)
    shape = (500, 32, 8, 256)
    f32, bf16 = (memory.step_peak("cpp", dtype, shape) for dtype in ("float32", "bfloat16"))
    assert f32 > 30 and bf16 < bound * f32, (f32, bf16)
