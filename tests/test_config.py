"""myrnn_fast.config: one home for every knob, validated, restorable, applied by its owner."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import myrnn_fast
from myrnn_fast import config


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MYRNN_")}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=clean | env, timeout=120)


@pytest.mark.parametrize("knob", config.KNOBS.values(), ids=list(config.KNOBS))
def test_every_knob_is_described_and_its_default_is_valid(knob):
    assert knob.env == "MYRNN_" + knob.name.upper()
    assert knob.validate(knob.default) == knob.default
    assert knob.help
    assert knob.type in (str, int)
    assert knob.type is str or knob.choices is not None or knob.minimum is not None


def test_describe_lists_every_knob_with_value_default_and_variable():
    rows = {row["name"]: row for row in config.describe()}
    assert list(rows) == list(config.KNOBS)
    for name, row in rows.items():
        assert row["value"] == config.get(name)
        assert row["default"] == config.KNOBS[name].default
        assert row["env"] == config.KNOBS[name].env


def test_override_sets_and_restores_even_on_error():
    before = config.get("numba_parallel_min_rows")
    with pytest.raises(KeyError):
        with config.override(numba_parallel_min_rows=before + 3):
            assert config.get("numba_parallel_min_rows") == before + 3
            raise KeyError
    assert config.get("numba_parallel_min_rows") == before


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("cpu_path", "blas", "valid values are: auto, tiles, gemm"),
        ("cuda_rows_per_block", 3, "valid values are: 0, 1, 2, 4, 8"),
        ("numba_gemm_min_hidden", 0, "at least 1"),
        ("numba_parallel_min_work", "lots", "must be an integer"),
        ("numba_parallel_min_work", True, "must be an integer"),
        ("cpu_isa", 2, "must be a string"),
        ("backend", "fastest", "valid values are: auto, reference, torch, numba, cpp"),
    ],
)
def test_an_invalid_value_is_a_value_error_listing_the_valid_ones(name, value, message):
    before = config.get(name)
    with pytest.raises(ValueError, match=message):
        config.set(name, value)
    assert config.get(name) == before


def test_an_unknown_knob_lists_every_name():
    with pytest.raises(ValueError, match="valid names are: backend, cpu_isa"):
        config.get("cpu_pth")


def test_integers_from_text_as_the_environment_gives_them():
    with config.override(numba_parallel_min_work=" 0x100 "):
        assert config.get("numba_parallel_min_work") == 256


def test_an_owner_receives_current_values_then_every_change_and_can_refuse(monkeypatch):
    monkeypatch.setitem(config._sinks, "numba", list(config._sinks.get("numba", [])))
    seen = []

    def apply(name, value):
        if value == 999:
            raise ValueError("not on this machine")
        seen.append((name, value))

    config.bind("numba", apply)
    assert dict(seen)["numba_parallel_min_rows"] == config.get("numba_parallel_min_rows")
    seen.clear()
    with config.override(numba_parallel_min_rows=7):
        assert seen == [("numba_parallel_min_rows", 7)]
        with pytest.raises(ValueError, match="not on this machine"):
            config.set("numba_parallel_min_rows", 999)
        assert config.get("numba_parallel_min_rows") == 7  # refused: the previous value stays
        assert seen[-1] == ("numba_parallel_min_rows", 7)  # and the owner got it back


def test_the_backend_default_is_the_backend_knob():
    before = myrnn_fast.get_backend()
    with myrnn_fast.use_backend("torch"):
        assert config.get("backend") == "torch" == myrnn_fast.get_backend()
        with config.override(backend="reference"):
            assert myrnn_fast.get_backend() == "reference"
        assert myrnn_fast.get_backend() == "torch"
    assert myrnn_fast.get_backend() == before == config.get("backend")


def test_the_environment_sets_knobs_at_import():
    result = _python(
        "from myrnn_fast import config; print(config.get('cpu_path'), config.get('numba_parallel_min_work'))",
        MYRNN_CPU_PATH="gemm",
        MYRNN_NUMBA_PARALLEL_MIN_WORK="1000",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["gemm", "1000"]


def test_a_bad_environment_value_fails_the_import_naming_the_variable():
    result = _python("import myrnn_fast", MYRNN_CPU_PATH="kernel")
    assert result.returncode != 0
    assert "ValueError: MYRNN_CPU_PATH: unknown cpu_path 'kernel'; valid values are: auto, tiles, gemm" in result.stderr
