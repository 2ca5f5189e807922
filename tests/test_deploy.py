"""Deployment routes (issue 14): a model holding myrnn_fast.RNN traces, exports and converts to
ONNX wherever one holding torch.nn.RNN does, and the result reproduces eager at NEW sizes (other
T and B than the example's) and after save/load, for every backend. Where a route cannot work
here it fails while recording, naming what works."""

import contextlib
import io
import logging
import os
import shutil
import subprocess
import sys
import warnings

import pytest
import torch
from torch.export import Dim
from torch.nn.utils.rnn import pack_padded_sequence

import myrnn_fast
from myrnn_fast.backends import _cpp
from myrnn_fast.export import DeploymentError

# Tracing warns about every Python int it sees (the checks below say whether a trace is right),
# and torch 2.13 deprecates TorchScript, which users still deploy with.
pytestmark = [
    pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning"),
    pytest.mark.filterwarnings("ignore:`torch.jit.*deprecated:DeprecationWarning"),
]

HAS_EXTENSION = _cpp.ops is not None
needs_extension = pytest.mark.skipif(not HAS_EXTENSION, reason="the C++ extension is not built")

# Small shapes: the example is (T=7, B=3); every check runs at (T=11, B=5) and (T=1, B=1).
I, H = 4, 5
CONFIGS = {
    "2layers-bidir": dict(num_layers=2, bidirectional=True),
    "batchfirst-relu-nobias": dict(batch_first=True, nonlinearity="relu", bias=False),
}
NEW_SIZES = [(11, 5), (1, 1)]


def _model(backend, **kwargs):
    torch.manual_seed(0)
    return myrnn_fast.RNN(I, H, backend=backend, **kwargs).eval()


def _input(model, steps, batch):
    shape = (batch, steps, I) if model.batch_first else (steps, batch, I)
    return torch.randn(shape)


def _hx(model, batch):
    return torch.randn(model.num_layers * (2 if model.bidirectional else 1), batch, H)


def _close(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(torch.as_tensor(g), w.detach(), rtol=1e-5, atol=1e-5)


def _reloaded_trace(traced):
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer)
    buffer.seek(0)
    return torch.jit.load(buffer)


def _reloaded_program(program):
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    buffer.seek(0)
    return torch.export.load(buffer)


@pytest.fixture
def no_extension(monkeypatch):
    """This process as one where myrnn_fast._C does not load."""
    monkeypatch.setattr(_cpp, "ops", None)
    monkeypatch.setattr(_cpp, "_import_error", "simulated: no _C here", raising=False)


# ---- torch.jit.trace --------------------------------------------------------------------------


@needs_extension
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("config", CONFIGS)
def test_trace_reproduces_eager_at_new_sizes(backend, config, grad):
    model = _model(backend, **CONFIGS[config])
    with torch.set_grad_enabled(grad), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(model, (_input(model, 7, 3), _hx(model, 3)))
    assert "myrnn_fast::rnn_forward" in str(traced.inlined_graph)
    assert "PythonOp" not in str(traced.inlined_graph)  # nothing that jit.save cannot keep
    reloaded = _reloaded_trace(traced)
    for steps, batch in NEW_SIZES:
        x, hx = _input(model, steps, batch), _hx(model, batch)
        want = model(x, hx)
        _close(traced(x, hx), want)
        _close(reloaded(x, hx), want)


@needs_extension
def test_trace_without_hx_and_unbatched(backend):
    model = _model(backend)
    with torch.no_grad():
        traced = torch.jit.trace(model, (torch.randn(7, 3, I),))
        unbatched = torch.jit.trace(model, (torch.randn(7, I),))
    x = torch.randn(11, 5, I)
    _close(_reloaded_trace(traced)(x), model(x))
    _close(_reloaded_trace(unbatched)(x[:, 0]), model(x[:, 0]))


@needs_extension
def test_traced_module_trains(backend):
    """The op carries its autograd: a trace taken with grad on backpropagates like eager."""
    model = _model(backend, num_layers=2)
    traced = torch.jit.trace(model, (torch.randn(7, 3, I),))
    x = torch.randn(11, 5, I)
    traced(x)[0].sum().backward()
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model(x)[0].sum().backward()
    for g, p in zip(got, model.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_trace_cell(backend, grad):
    torch.manual_seed(0)
    cell = myrnn_fast.RNNCell(I, H, backend=backend)
    with torch.set_grad_enabled(grad):
        traced = _reloaded_trace(torch.jit.trace(cell, (torch.randn(3, I), torch.randn(3, H))))
    x, h = torch.randn(6, I), torch.randn(6, H)
    torch.testing.assert_close(traced(x, h), cell(x, h).detach())


def test_trace_without_extension_fails_naming_what_works(backend, no_extension):
    model = _model(backend)
    with pytest.raises(DeploymentError, match=r"torch\.jit\.trace.*extension.*torch\.nn\.RNN"):
        torch.jit.trace(model, (torch.randn(7, 3, I),))
    if backend != "cpp":  # the simulation takes the cpp backend's kernels away too
        model(torch.randn(7, 3, I))  # eager is unaffected


@pytest.mark.filterwarnings("ignore:pack_padded_sequence has been called")
def test_recording_packed_input_is_refused(backend):
    model = _model(backend)

    class Packs(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = model

        def forward(self, x):
            return self.rnn(pack_padded_sequence(x, [7, 5, 2]))[1]

    x = torch.randn(7, 3, I)
    with pytest.raises(DeploymentError, match="PackedSequence.*padded"):
        torch.jit.trace(Packs(), (x,))
    with pytest.raises(DeploymentError, match="PackedSequence.*padded"):
        torch.export.export(Packs(), (x,))


# ---- torch.export -----------------------------------------------------------------------------


def _dynamic(model, with_hx=True):
    steps, batch = Dim("T"), Dim("B")
    x = {0: batch, 1: steps} if model.batch_first else {0: steps, 1: batch}
    return (x, {1: batch}) if with_hx else (x,)


@needs_extension
@pytest.mark.parametrize("config", CONFIGS)
def test_export_dynamic_t_and_b(backend, config):
    model = _model(backend, **CONFIGS[config])
    program = torch.export.export(model, (_input(model, 7, 3), _hx(model, 3)), dynamic_shapes=_dynamic(model))
    targets = {str(n.target) for n in program.graph.nodes}
    assert "myrnn_fast.rnn_forward.default" in targets
    reloaded = _reloaded_program(program).module()
    for steps, batch in NEW_SIZES:
        x, hx = _input(model, steps, batch), _hx(model, batch)
        want = model(x, hx)
        _close(program.module()(x, hx), want)
        _close(reloaded(x, hx), want)


def test_export_cell_dynamic_b(backend):
    torch.manual_seed(0)
    cell = myrnn_fast.RNNCell(I, H, backend=backend)
    batch = Dim("B")
    program = torch.export.export(cell, (torch.randn(3, I), torch.randn(3, H)), dynamic_shapes=({0: batch}, {0: batch}))
    x, h = torch.randn(6, I), torch.randn(6, H)
    torch.testing.assert_close(_reloaded_program(program).module()(x, h), cell(x, h).detach())


def test_export_without_extension_fails_naming_what_works(backend, no_extension):
    model = _model(backend)
    with pytest.raises(DeploymentError, match=r"torch\.export.*extension.*torch\.nn\.RNN"):
        torch.export.export(model, (torch.randn(7, 3, I),))


# ---- ONNX -------------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet():
    """torch.onnx prints its progress and logs warnings about opset conversion."""
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(logging.NOTSET)


def _ort_outputs(path, *inputs):
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return session.run(None, {n: t.numpy() for n, t in zip(names, inputs)})


def _rnn_nodes(path):
    onnx = pytest.importorskip("onnx")
    return [n for n in onnx.load(str(path)).graph.node if n.op_type == "RNN"]


@pytest.mark.parametrize(
    "config",
    [*CONFIGS, "tanh-bias-no-hx"],
)
def test_onnx_export_runs_in_onnxruntime_at_new_sizes(backend, config, tmp_path):
    pytest.importorskip("onnxscript")
    model = _model(backend, **CONFIGS.get(config, {}))
    with_hx = config != "tanh-bias-no-hx"
    args = (_input(model, 7, 3), _hx(model, 3)) if with_hx else (_input(model, 7, 3),)
    path = tmp_path / "model.onnx"
    with _quiet():  # plain torch.onnx.export, no extra argument
        torch.onnx.export(model, args, path, dynamo=True, dynamic_shapes=_dynamic(model, with_hx))
    assert len(_rnn_nodes(path)) == model.num_layers * (2 if model.bidirectional else 1)
    for steps, batch in NEW_SIZES:
        new = (_input(model, steps, batch), _hx(model, batch)) if with_hx else (_input(model, steps, batch),)
        _close(_ort_outputs(path, *new), model(*new))


def test_onnx_export_needs_no_extension(no_extension, tmp_path):
    pytest.importorskip("onnxscript")
    model = _model("torch", num_layers=2)
    path = tmp_path / "model.onnx"
    with _quiet():
        myrnn_fast.export_onnx(model, (torch.randn(7, 3, I),), path)
    x = torch.randn(11, 5, I)
    _close(_ort_outputs(path, x), model(x))


@needs_extension
def test_onnx_from_exported_program_with_translation_table(tmp_path):
    pytest.importorskip("onnxscript")
    model = _model("cpp", num_layers=2, bidirectional=True)
    x, hx = _input(model, 7, 3), _hx(model, 3)
    program = torch.export.export(model, (x, hx), dynamic_shapes=_dynamic(model))
    path = tmp_path / "model.onnx"
    with _quiet():
        torch.onnx.export(
            program, (x, hx), path, dynamo=True, custom_translation_table=myrnn_fast.onnx_translation_table()
        )
    assert len(_rnn_nodes(path)) == 4
    x, hx = _input(model, 11, 5), _hx(model, 5)
    _close(_ort_outputs(path, x, hx), model(x, hx))


@needs_extension
def test_onnx_torchscript_exporter(tmp_path):
    pytest.importorskip("onnx")
    model = _model("numba", bidirectional=True, nonlinearity="relu")
    path = tmp_path / "model.onnx"
    with _quiet():
        torch.onnx.export(
            model, (torch.randn(7, 3, I),), path, dynamo=False,
            input_names=["x"], dynamic_axes={"x": {0: "T", 1: "B"}},
        )
    x = torch.randn(11, 5, I)
    _close(_ort_outputs(path, x), model(x))


def test_onnx_cell(backend, tmp_path):
    pytest.importorskip("onnxscript")
    torch.manual_seed(0)
    cell = myrnn_fast.RNNCell(I, H, backend=backend, nonlinearity="relu")
    path = tmp_path / "cell.onnx"
    batch = Dim("B")
    with _quiet():
        torch.onnx.export(
            cell, (torch.randn(3, I), torch.randn(3, H)), path, dynamo=True,
            dynamic_shapes=({0: batch}, {0: batch}),
        )
    x, h = torch.randn(6, I), torch.randn(6, H)
    _close(_ort_outputs(path, x, h), (cell(x, h),))


# ---- AOTInductor and libtorch: a C++ compiler each, so outside the default run ----------------


@pytest.mark.slow
@needs_extension
def test_aoti_package_runs_at_new_sizes(tmp_path):
    model = _model("torch", num_layers=2, bidirectional=True)
    x, hx = _input(model, 7, 3), _hx(model, 3)
    program = torch.export.export(model, (x, hx), dynamic_shapes=_dynamic(model))
    path = torch._inductor.aoti_compile_and_package(program, package_path=str(tmp_path / "model.pt2"))
    runner = torch._inductor.aoti_load_package(path)
    for steps, batch in NEW_SIZES:
        x, hx = _input(model, steps, batch), _hx(model, batch)
        _close(runner(x, hx), model(x, hx))


@pytest.mark.slow
@needs_extension
@pytest.mark.skipif(shutil.which("cmake") is None or shutil.which("c++") is None, reason="needs cmake and a C++ compiler")
def test_libtorch_loads_the_trace(tmp_path):
    """docs/deploying.md's C++ route: dlopen the extension, torch::jit::load the trace, run it."""
    source = os.path.join(os.path.dirname(__file__), "deploy_cpp")
    build = tmp_path / "build"
    configure = [
        "cmake", "-S", source, "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
        f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}", f"-DPython3_EXECUTABLE={sys.executable}",
    ]
    for command in (configure, ["cmake", "--build", str(build), "-j2"]):
        done = subprocess.run(command, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    model = _model("numba", num_layers=2, bidirectional=True)
    with torch.no_grad():  # the route that once gave a silently wrong trace
        torch.jit.trace(model, (torch.randn(7, 3, I),)).save(str(tmp_path / "model.pt"))
    x = torch.randn(11, 5, I)
    torch.save(x, tmp_path / "input.pt")
    run = [str(build / "load_traced"), myrnn_fast._C.__file__, *(str(tmp_path / f) for f in ("model.pt", "input.pt", "output.pt"))]
    done = subprocess.run(run, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    _close(torch.load(tmp_path / "output.pt"), model(x))
