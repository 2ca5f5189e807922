"""Malformed input passed straight to a backend's entry points, past the module's checks: every
backend's ``layer`` (and ``cell`` where it has one) and the extension's raw ops.

No input may crash the process. The native backends (``numba``, ``cpp``) touch raw memory, so
they must validate before they do: every malformed case is a Python exception. The pure-torch
backends (``reference``, ``torch``) may also return, as the contract leaves validation to the
module, but must not crash either. Odd valid layouts (views with gaps, stride-0 broadcasts,
transposed weights) must give the right numbers on every backend.

The cases run in a child process, so that a crash fails the case that caused it and not the
whole test session; a crash restarts the child on the remaining cases.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

NATIVE = {"numba", "cpp"}
PYTHON_EXCEPTIONS = (RuntimeError, ValueError, TypeError, IndexError)

I, H, B, T = 3, 4, 2, 5


def _args(**change):
    """Valid ``layer`` arguments (float32, dense [T, B, I]) with some replaced."""
    g = torch.Generator().manual_seed(0)
    args = dict(
        x=torch.randn(T, B, I, generator=g), h0=torch.randn(B, H, generator=g),
        w_ih=torch.randn(H, I, generator=g), w_hh=torch.randn(H, H, generator=g),
        b_ih=torch.randn(H, generator=g), b_hh=torch.randn(H, generator=g),
        nonlinearity="tanh", batch_sizes=None,
    )
    for key, value in change.items():
        args[key] = value(args) if callable(value) else value
    return args


def _packed(n_rows, sizes, **change):
    return _args(x=torch.randn(n_rows, I), batch_sizes=torch.tensor(sizes), **change)


_long = lambda *shape: torch.ones(*shape, dtype=torch.long)  # noqa: E731
_meta = lambda *shape: torch.empty(*shape, device="meta")  # noqa: E731

# Malformed: every native backend must raise.
BAD_LAYER_CASES = {
    "x 2-D without batch_sizes": lambda: _args(x=lambda a: a["x"][0]),
    "x 4-D": lambda: _args(x=lambda a: a["x"][None]),
    "x wrong feature size": lambda: _args(x=torch.randn(T, B, I + 1)),
    "x not a tensor": lambda: _args(x=[[1.0, 2.0, 3.0]]),
    "h0 wrong batch": lambda: _args(h0=torch.randn(B + 1, H)),
    "h0 wrong hidden": lambda: _args(h0=torch.randn(B, H + 1)),
    "h0 3-D": lambda: _args(h0=torch.randn(1, B, H)),
    "w_ih wrong hidden": lambda: _args(w_ih=torch.randn(H + 1, I)),
    "w_hh not square": lambda: _args(w_hh=torch.randn(H, H + 1)),
    "w_hh 1-D": lambda: _args(w_hh=torch.randn(H * H)),
    "b_ih wrong size": lambda: _args(b_ih=torch.randn(H + 1)),
    "b_hh wrong size": lambda: _args(b_hh=torch.randn(H - 1)),
    "b_ih 2-D": lambda: _args(b_ih=torch.randn(1, H)),
    "b_ih without b_hh": lambda: _args(b_hh=None),
    "b_hh without b_ih": lambda: _args(b_ih=None),
    "x float64": lambda: _args(x=lambda a: a["x"].double()),
    "h0 float64": lambda: _args(h0=lambda a: a["h0"].double()),
    "w_hh float64": lambda: _args(w_hh=lambda a: a["w_hh"].double()),
    "b_hh float64": lambda: _args(b_hh=lambda a: a["b_hh"].double()),
    "x integer": lambda: _args(x=_long(T, B, I)),
    "x bool": lambda: _args(x=torch.ones(T, B, I, dtype=torch.bool)),
    "everything integer": lambda: _args(
        x=_long(T, B, I), h0=_long(B, H), w_ih=_long(H, I), w_hh=_long(H, H), b_ih=None, b_hh=None
    ),
    "unknown nonlinearity": lambda: _args(nonlinearity="gelu"),
    "nonlinearity None": lambda: _args(nonlinearity=None),
    "batch_sizes sum above rows": lambda: _packed(5, [2, 2, 2]),
    "batch_sizes sum below rows": lambda: _packed(5, [2, 1, 1]),
    "batch_sizes increasing": lambda: _packed(5, [1, 2, 2]),
    "batch_sizes above h0 batch": lambda: _packed(6, [3, 3]),
    "batch_sizes negative": lambda: _packed(4, [2, 2, -1, 1]),
    "batch_sizes float": lambda: _packed(4, [2.0, 2.0]),
    "batch_sizes 2-D": lambda: _packed(4, [[2, 2]]),
    "packed x 3-D": lambda: _args(x=torch.randn(2, 2, I), batch_sizes=torch.tensor([2, 2])),
    "huge batch_sizes": lambda: _packed(4, [2**40, 2]),
}

# Mixed CPU and meta tensors: an error, or shape inference alone (outputs on meta, which no
# kernel can have touched), as the dispatcher sends a call with any meta tensor to the op's fake.
MIXED_META_LAYER_CASES = {
    "x on meta": lambda: _args(x=_meta(T, B, I)),
    "h0 on meta": lambda: _args(h0=_meta(B, H)),
    "w_hh on meta": lambda: _args(w_hh=_meta(H, H)),
    "batch_sizes on meta": lambda: _args(x=torch.randn(4, I), batch_sizes=_meta(2).long()),
}

# Degenerate but not clearly wrong: any Python exception or a result, never a crash.
DEGENERATE_LAYER_CASES = {
    "T = 0": lambda: _args(x=torch.randn(0, B, I)),
    "batch_sizes empty": lambda: _packed(0, []),
    "batch_sizes below h0 batch": lambda: _packed(2, [1, 1]),
    "batch_sizes with a zero step": lambda: _packed(4, [2, 2, 0]),
}


def _odd_views():
    g = torch.Generator().manual_seed(1)
    return _args(
        x=torch.randn(T, 2 * B, I + 2, generator=g)[:, ::2, 1:-1],  # gaps in two dimensions
        h0=torch.randn(H, B, generator=g).t(),  # transposed
        w_ih=torch.randn(I, H, generator=g).t(),
        w_hh=torch.randn(2 * H, 2 * H, generator=g)[::2, 1::2],
        b_ih=torch.randn(2 * H, generator=g)[::2],
    )


# Valid, in layouts a kernel that assumes contiguity gets wrong: must match a plain loop.
VALID_LAYER_CASES = {
    "strided and transposed": _odd_views,
    "stride-0 broadcasts": lambda: _args(
        x=torch.randn(1, 1, I).expand(T, B, I), h0=torch.randn(1, H).expand(B, H),
        b_hh=torch.randn(1).expand(H),
    ),
    "packed, strided rows": lambda: _args(x=torch.randn(6, 2 * I)[:, ::2], batch_sizes=torch.tensor([2, 2, 1, 1])),
    "relu, no bias, float64": lambda: {
        **{k: v.double() if isinstance(v, torch.Tensor) else v for k, v in _odd_views().items()},
        "b_ih": None, "b_hh": None, "nonlinearity": "relu",
    },
}


def _cell_args(**change):
    a = _args(**change)
    return dict(x=a["x"][0], h=a["h0"], **{k: a[k] for k in ("w_ih", "w_hh", "b_ih", "b_hh", "nonlinearity")})


BAD_CELL_CASES = {
    "x 1-D": lambda: _cell_args(x=torch.randn(T, I)),  # the cell takes step 0 of x
    "x 3-D": lambda: _cell_args(x=torch.randn(T, 1, B, I)),
    "x wrong feature size": lambda: _cell_args(x=torch.randn(T, B, I + 1)),
    "h wrong batch": lambda: _cell_args(h0=torch.randn(B + 1, H)),
    "h wrong hidden": lambda: _cell_args(h0=torch.randn(B, H + 1)),
    "w_hh not square": lambda: _cell_args(w_hh=torch.randn(H, H + 1)),
    "b_hh wrong size": lambda: _cell_args(b_hh=torch.randn(H + 2)),
    "x float64": lambda: _cell_args(x=torch.randn(T, B, I, dtype=torch.float64)),
    "x integer": lambda: _cell_args(x=_long(T, B, I)),
    "unknown nonlinearity": lambda: _cell_args(nonlinearity="gelu"),
}


def _grad_args(**change):
    """Arguments of the extension's ``rnn_backward`` op, valid (from a real forward) but changed."""
    a = _args()
    out = torch.tanh(torch.randn(T, B, H))
    args = dict(
        grad_out=torch.randn(T, B, H), grad_h_n=torch.randn(B, H), x=a["x"], h0=a["h0"], w_ih=a["w_ih"],
        w_hh=a["w_hh"], out=out, batch_sizes=None, nonlinearity="tanh", need_grad_x=True,
    )
    for key, value in change.items():
        args[key] = value(args) if callable(value) else value
    return args


MIXED_META_CELL_CASES = {"h on meta": lambda: _cell_args(h0=_meta(B, H))}

BAD_BACKWARD_CASES = {
    "grad_out wrong shape": lambda: _grad_args(grad_out=torch.randn(T - 1, B, H)),
    "grad_h_n wrong shape": lambda: _grad_args(grad_h_n=torch.randn(B + 1, H)),
    "out wrong shape": lambda: _grad_args(out=torch.randn(T, B, H + 1)),
    "out shorter than x": lambda: _grad_args(out=torch.randn(T - 2, B, H)),
    "grad_out float64": lambda: _grad_args(grad_out=torch.randn(T, B, H, dtype=torch.float64)),
    "batch_sizes do not match x": lambda: _grad_args(batch_sizes=torch.tensor([2, 2])),
    "unknown nonlinearity": lambda: _grad_args(nonlinearity="sigmoid"),
}


def _oracle(x, h0, w_ih, w_hh, b_ih, b_hh, nonlinearity, batch_sizes):
    """The recurrence as a plain loop over packed steps."""
    act = torch.tanh if nonlinearity == "tanh" else torch.relu
    steps = [x.shape[1]] * x.shape[0] if batch_sizes is None else batch_sizes.tolist()
    rows = x.reshape(-1, x.shape[-1])
    h, outs, offset = h0.clone(), [], 0
    for n in steps:
        z = rows[offset : offset + n] @ w_ih.t() + h[:n] @ w_hh.t()
        if b_ih is not None:
            z = z + b_ih + b_hh
        h[:n] = act(z)
        outs.append(h[:n].clone())
        offset += n
    out = torch.cat(outs)
    return (out if batch_sizes is not None else out.view(*x.shape[:2], -1)), h


# ---------------------------------------------------------------------------------------------
# The child process: runs cases, prints one JSON line as each starts and one as it ends.


def _entry(backend: str, entry: str):
    if entry == "rnn_backward op":
        import myrnn_fast.ops  # noqa: F401  (loads the extension)

        op = torch.ops.myrnn_fast.rnn_backward
        return lambda a: op(*a.values())
    from myrnn_fast import registry

    fn = getattr(registry.implementation(backend), entry)
    return lambda a: fn(*a.values())


def _table(entry, kind):
    return {
        ("layer", "bad"): BAD_LAYER_CASES, ("layer", "degenerate"): DEGENERATE_LAYER_CASES,
        ("layer", "valid"): VALID_LAYER_CASES, ("cell", "bad"): BAD_CELL_CASES,
        ("rnn_backward op", "bad"): BAD_BACKWARD_CASES, ("layer", "meta"): MIXED_META_LAYER_CASES,
        ("cell", "meta"): MIXED_META_CELL_CASES,
        ("rnn_backward op", "meta"): {"x on meta": lambda: _grad_args(x=_meta(T, B, I))},
    }[entry, kind]


def _run_case(backend, entry, kind, case):
    args = _table(entry, kind)[case]()
    try:
        result = _entry(backend, entry)(args)
    except Exception as exc:  # noqa: BLE001 - what was raised is the result
        return {"outcome": "raised", "type": type(exc).__name__, "kinds": [c.__name__ for c in type(exc).__mro__],
                "message": str(exc)[:300]}
    outputs = result if isinstance(result, (tuple, list)) else (result,)
    outcome = {"outcome": "returned", "devices": [t.device.type for t in outputs]}
    if kind == "valid":
        expected = _oracle(**args)
        outcome["maxdiff"] = max((a - b).abs().max().item() for a, b in zip(result, expected))
        outcome["shapes_match"] = all(a.shape == b.shape for a, b in zip(result, expected))
    return outcome


def _worker(keys):
    torch.set_num_threads(1)
    for key in keys:
        print(json.dumps({"start": key}), flush=True)
        result = _run_case(*key.split("|"))
        print(json.dumps({"key": key, **result}), flush=True)


# ---------------------------------------------------------------------------------------------
# The tests


def _backends():
    import myrnn_fast

    return myrnn_fast.available_backends()


def _all_keys():
    from myrnn_fast import registry

    keys = []
    for backend in _backends():
        impl = registry.implementation(backend)
        entries = ["layer"] + (["cell"] if hasattr(impl, "cell") else [])
        if backend == "cpp":
            entries.append("rnn_backward op")
        for entry in entries:
            for kind in ("bad", "meta", "degenerate", "valid"):
                try:
                    cases = _table(entry, kind)
                except KeyError:
                    continue
                keys += [f"{backend}|{entry}|{kind}|{case}" for case in cases]
    return keys


@pytest.fixture(scope="module")
def outcomes():
    """Every case's outcome, from child processes; a crash records the case and restarts."""
    remaining, results = _all_keys(), {}
    while remaining:
        child = subprocess.run(
            [sys.executable, __file__, *remaining], capture_output=True, text=True, timeout=600,
            env={**os.environ, "PYTHONFAULTHANDLER": "1"},
        )
        started = None
        for line in child.stdout.splitlines():
            record = json.loads(line)
            if "start" in record:
                started = record["start"]
            else:
                results[record.pop("key")] = record
                started = None
        if child.returncode != 0:
            if started is None:
                raise RuntimeError(f"case worker failed outside any case:\n{child.stderr[-3000:]}")
            code = child.returncode
            how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
            results[started] = {"outcome": "crashed", "how": how, "stderr": child.stderr[-2000:]}
        remaining = [k for k in remaining if k not in results]
    return results


def _params(kind, entries):
    keys = [k for k in _all_keys() if k.split("|")[2] == kind and k.split("|")[1] in entries]
    return pytest.mark.parametrize("key", keys, ids=[k.replace("|", "-") for k in keys])


def _describe(result):
    if result["outcome"] == "crashed":
        return f"crashed the process ({result['how']}):\n{result['stderr']}"
    if result["outcome"] == "raised":
        return f"raised {result['type']}: {result['message']}"
    return "returned a result"


@_params("bad", {"layer", "cell", "rnn_backward op"})
def test_malformed_input_raises(outcomes, key):
    backend = key.split("|")[0]
    result = outcomes[key]
    assert result["outcome"] != "crashed", _describe(result)
    if backend in NATIVE:
        assert result["outcome"] == "raised", f"{backend} must validate, but {_describe(result)}"
        expected = {c.__name__ for c in PYTHON_EXCEPTIONS}
        assert expected & set(result["kinds"]), _describe(result)
        assert result["message"], "the message must name the problem"


@_params("meta", {"layer", "cell", "rnn_backward op"})
def test_mixed_meta_raises_or_only_infers_shapes(outcomes, key):
    result = outcomes[key]
    assert result["outcome"] in ("raised", "returned"), _describe(result)
    if result["outcome"] == "returned" and key.split("|")[0] in NATIVE:
        # A CPU output here is memory no kernel wrote, or a kernel that read a meta tensor.
        assert set(result["devices"]) == {"meta"}, f"returned tensors on {result['devices']}"


@_params("degenerate", {"layer"})
def test_degenerate_input_does_not_crash(outcomes, key):
    result = outcomes[key]
    assert result["outcome"] in ("raised", "returned"), _describe(result)


@_params("valid", {"layer"})
def test_odd_layouts_give_the_right_numbers(outcomes, key):
    result = outcomes[key]
    assert result["outcome"] == "returned", _describe(result)
    assert result["shapes_match"]
    assert result["maxdiff"] < 1e-5, result["maxdiff"]


if __name__ == "__main__":
    _worker(sys.argv[1:])
