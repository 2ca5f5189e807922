"""Helpers shared by the backends: the contract's two input layouts seen as one."""

from __future__ import annotations

import torch
from torch import Tensor


def as_rows(x: Tensor, batch_sizes: Tensor | None) -> tuple[Tensor, list[int]]:
    """``x`` as packed rows ``[N, I]`` plus the number of rows of each step.

    Dense ``[T, B, I]`` is the packed layout whose steps all hold ``B`` rows, so both cases run
    through one loop.
    """
    if batch_sizes is None:
        steps, batch, features = x.shape
        return x.reshape(steps * batch, features), [batch] * steps
    return x, batch_sizes.tolist()


def like_input(out_rows: Tensor, x: Tensor, batch_sizes: Tensor | None) -> Tensor:
    """Give the output ``[N, H]`` the input's layout back (``[T, B, H]`` for dense input)."""
    if batch_sizes is None:
        return out_rows.view(x.shape[0], x.shape[1], out_rows.shape[1])
    return out_rows


def activation(nonlinearity: str):
    if nonlinearity == "tanh":
        return torch.tanh
    if nonlinearity == "relu":
        return torch.relu
    raise ValueError(f"Unknown nonlinearity '{nonlinearity}'. Select from 'tanh' or 'relu'.")
