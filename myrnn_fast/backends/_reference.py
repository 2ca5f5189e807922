"""``reference``: the article's algorithm, kept as the oracle.

Loop over time, then over the batch rows, and run one ``Linear`` on the concatenation
``[x_t, h]`` with the weights ``cat([w_ih, w_hh], 1)``: exactly what the article's ``MyRNNCell``
does row by row. Autograd is torch's own. Slow by design: every row of every step is a handful
of tensor operations.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._common import activation, as_rows, input_bias, like_input

DEVICE_TYPES = None  # plain torch operations run wherever torch does


def unavailable_reason() -> str | None:
    return None


def layer(
    x: Tensor,
    h0: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None,
    b_hh: Tensor | None,
    nonlinearity: str,
    batch_sizes: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    rows, batch_sizes = as_rows(x, batch_sizes)  # a list from here on
    act = activation(nonlinearity)
    if w_hh.dtype != w_ih.dtype:  # cat would promote (an integer w_hh to float) where torch.nn refuses
        raise RuntimeError(f"w_ih and w_hh must have the same dtype, but got {w_ih.dtype} and {w_hh.dtype}")
    weight = torch.cat([w_ih, w_hh], 1)
    bias = input_bias(b_ih, b_hh)

    hidden = list(h0.unbind(0))  # one state per batch row
    outputs = []
    offset = 0
    for active in batch_sizes:  # time
        for b in range(active):  # batch rows still running at this step
            xh = torch.cat((rows[offset + b], hidden[b]))
            hidden[b] = act(F.linear(xh, weight, bias))
            outputs.append(hidden[b])
        offset += active

    if outputs:
        out = torch.stack(outputs)
        h_n = torch.stack(hidden)
    else:  # an empty batch: keep the graph to the weights so their gradients are zeros, not None
        out = act(F.linear(torch.cat((rows, h0[:0]), 1), weight, bias))
        h_n = act(F.linear(torch.cat((rows[:0], h0), 1), weight, bias))
    return like_input(out, x), h_n
