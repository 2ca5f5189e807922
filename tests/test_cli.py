"""The command line: `myrnn-fast` and `python -m myrnn_fast`, `info` and `demo`."""

import json
import os
import shutil
import subprocess
import sys

import pytest

import myrnn_fast
from myrnn_fast import cli


def _run(*args, module=True):
    command = [sys.executable, "-m", "myrnn_fast", *args] if module else [shutil.which("myrnn-fast"), *args]
    env = {k: v for k, v in os.environ.items() if k != "MYRNN_BACKEND"}
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)


def test_info_reports_versions_build_and_every_backend():
    result = _run("info")
    assert result.returncode == 0, result.stderr
    text = result.stdout
    for needle in ("torch", "compiler", "built against torch", "thread pool", "CUDA", *myrnn_fast.BACKENDS):
        assert needle in text
    backend_lines = text.split("\nbackends\n", 1)[1].splitlines()
    for name in myrnn_fast.BACKENDS:
        line = next(line for line in backend_lines if line.strip().startswith(name + " "))
        assert ("unavailable:" in line) == (name not in myrnn_fast.available_backends())


def test_info_json():
    info = json.loads(_run("info", "--json").stdout)
    assert info["extension"]["built"] is True
    assert info["extension"]["torch"] and info["extension"]["compiler"]
    assert set(info["backends"]) == set(myrnn_fast.BACKENDS)
    assert info["resolved"]["cpu"] == myrnn_fast.resolve_backend("cpu", "auto")  # env var stripped


@pytest.mark.skipif(shutil.which("myrnn-fast") is None, reason="console script not on PATH")
def test_console_script():
    result = _run("demo", "--epochs", "2", "--json", module=False)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[-1])["epochs"] == 2


def test_demo_json_last_line(backend):
    result = _run("demo", "--backend", backend, "--epochs", "2", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(summary) == {"backend", "epochs", "final_loss", "seconds_per_epoch"}
    assert summary["backend"] == backend and summary["epochs"] == 2
    assert 0 < summary["final_loss"] < 1 and summary["seconds_per_epoch"] > 0


def test_demo_progress_and_plots(tmp_path):
    pytest.importorskip("matplotlib")
    result = _run("demo", "--epochs", "3", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert sum(line.startswith("epoch") for line in result.stdout.splitlines()) == 3
    for name in ("loss.png", "prediction.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("args", [["demo", "--backend", "nope"], ["demo", "--epochs", "0"], ["frobnicate"], []])
def test_bad_arguments_exit_with_usage(args, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(args)
    assert info.value.code == 2
    assert "usage" in capsys.readouterr().err


@pytest.mark.skipif(not set(myrnn_fast.BACKENDS) - set(myrnn_fast.available_backends()),
                    reason="every backend is available")
def test_demo_with_an_unavailable_backend_says_why(capsys):
    name = next(b for b in myrnn_fast.BACKENDS if b not in myrnn_fast.available_backends())
    assert cli.main(["demo", "--backend", name, "--epochs", "1"]) == 2
    assert "not available" in capsys.readouterr().err
