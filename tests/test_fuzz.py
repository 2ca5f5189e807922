"""Property-based parity: random constructor options, shapes, dtypes, packed lengths and ``hx``,
every backend against ``torch.nn.RNN`` / ``torch.nn.RNNCell`` with the same weights, forward
values and the gradients of the inputs, ``hx`` and every parameter.

The examples come from the hypothesis profile loaded in conftest: ``ci`` (the default) is a fixed,
derandomized set; ``HYPOTHESIS_PROFILE=long pytest tests/test_fuzz.py`` explores many more.
"""

import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.nn.utils.rnn import pack_sequence

from parity import cell_pair, check_module, rnn_pair

DTYPES = st.sampled_from([torch.float32, torch.float64])


def _sizes(backend):
    # The reference loop runs a few tensor operations per row per step: keep it tiny.
    return (2, 3, 4) if backend == "reference" else (3, 4, 7)


@st.composite
def rnn_cases(draw, backend):
    max_layers, max_batch, max_steps = _sizes(backend)
    case = dict(
        layers=draw(st.integers(1, max_layers)),
        bidirectional=draw(st.booleans()),
        batch_first=draw(st.booleans()),
        bias=draw(st.booleans()),
        nonlinearity=draw(st.sampled_from(["tanh", "relu"])),
        dtype=draw(DTYPES),
        input_size=draw(st.integers(1, 5)),
        hidden_size=draw(st.integers(1, 5)),
        form=draw(st.sampled_from(["dense", "unbatched", "packed"])),
        with_hx=draw(st.booleans()),
        scale=draw(st.sampled_from([0.1, 1.0, 3.0])),
        seed=draw(st.integers(0, 2**16)),
    )
    if case["form"] == "packed":
        lengths = draw(st.lists(st.integers(1, max_steps), min_size=1, max_size=max_batch))
        enforce_sorted = draw(st.booleans())
        case["lengths"] = sorted(lengths, reverse=True) if enforce_sorted else lengths
        case["enforce_sorted"] = enforce_sorted
    else:
        case["steps"] = draw(st.integers(1, max_steps))
        case["batch"] = draw(st.integers(0, max_batch))  # 0: an empty batch, which torch.nn accepts
    return case


def _rnn_inputs(case):
    dtype, I, H = case["dtype"], case["input_size"], case["hidden_size"]
    states = case["layers"] * (2 if case["bidirectional"] else 1)

    def make():
        g = torch.Generator().manual_seed(case["seed"] + 1)

        def randn(*shape):
            return (case["scale"] * torch.randn(*shape, generator=g, dtype=dtype)).requires_grad_()

        if case["form"] == "packed":
            seqs = [randn(n, I) for n in case["lengths"]]
            data, leaves, batch = pack_sequence(seqs, case["enforce_sorted"]), seqs, len(seqs)
            hx_shape = (states, batch, H)
        elif case["form"] == "unbatched":
            data = randn(case["steps"], I)
            leaves, hx_shape = [data], (states, H)
        else:
            T, B = case["steps"], case["batch"]
            data = randn(*((B, T, I) if case["batch_first"] else (T, B, I)))
            leaves, hx_shape = [data], (states, B, H)
        if not case["with_hx"]:
            return (data,), leaves
        hx = randn(*hx_shape)
        return (data, hx), [*leaves, hx]

    return make


@given(data=st.data())
def test_rnn_matches_torch(backend, data):
    case = data.draw(rnn_cases(backend), label="case")
    ref, ours = rnn_pair(
        backend, case["input_size"], case["hidden_size"], case["layers"],
        nonlinearity=case["nonlinearity"], bias=case["bias"], batch_first=case["batch_first"],
        bidirectional=case["bidirectional"], dtype=case["dtype"], seed=case["seed"],
    )
    check_module(ref, ours, _rnn_inputs(case), case["dtype"])


@given(
    dtype=DTYPES,
    input_size=st.integers(1, 6),
    hidden_size=st.integers(1, 6),
    bias=st.booleans(),
    nonlinearity=st.sampled_from(["tanh", "relu"]),
    batch=st.one_of(st.none(), st.integers(0, 5)),  # None: unbatched 1-D input
    with_hx=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_cell_matches_torch(backend, dtype, input_size, hidden_size, bias, nonlinearity, batch, with_hx, seed):
    ref, ours = cell_pair(
        backend, input_size, hidden_size, bias=bias, nonlinearity=nonlinearity, dtype=dtype, seed=seed
    )
    lead = () if batch is None else (batch,)

    def make():
        g = torch.Generator().manual_seed(seed + 1)
        x = torch.randn(*lead, input_size, generator=g, dtype=dtype).requires_grad_()
        if not with_hx:
            return (x,), [x]
        hx = torch.randn(*lead, hidden_size, generator=g, dtype=dtype).requires_grad_()
        return (x, hx), [x, hx]

    check_module(ref, ours, make, dtype)
