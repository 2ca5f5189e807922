"""The native extension builds for real and reports how."""

import json

import torch

from myrnn_fast import cli


def test_extension_loads_and_registers_its_namespace():
    import myrnn_fast._C  # noqa: F401

    assert all(hasattr(torch.ops.myrnn_fast, op) for op in ("rnn_forward", "rnn_backward", "rnn_cell"))
    info = json.loads(myrnn_fast._C.build_info())
    assert info["torch"].split(".")[:2] == torch.__version__.split(".")[:2]
    assert info["cplusplus"] >= 202002
    assert info["cuda"] is False or torch.cuda.is_available() or torch.version.cuda
    assert info["num_threads"] == torch.get_num_threads()


def test_build_info_reads_the_thread_count_when_called():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert cli.extension_info()["num_threads"] == 1
    finally:
        torch.set_num_threads(before)
