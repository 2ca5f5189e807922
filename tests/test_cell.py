"""RNNCell against torch.nn.RNNCell with the same weights."""

import pytest
import torch

from parity import check_module, cell_pair

I, H = 3, 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batch", [None, 1, 5])  # None: unbatched 1-D input
@pytest.mark.parametrize("with_hx", [True, False])
def test_cell(backend, dtype, nonlinearity, bias, batch, with_hx):
    ref, ours = cell_pair(backend, I, H, bias=bias, nonlinearity=nonlinearity, dtype=dtype)

    def make():
        g = torch.Generator().manual_seed(4)
        lead = () if batch is None else (batch,)
        x = torch.randn(*lead, I, generator=g, dtype=dtype).requires_grad_()
        if not with_hx:
            return (x,), [x]
        hx = torch.randn(*lead, H, generator=g, dtype=dtype).requires_grad_()
        return (x, hx), [x, hx]

    (h,) = check_module(ref, ours, make, dtype)
    assert h.shape == ((H,) if batch is None else (batch, H))


def test_cell_unrolled_over_a_sequence_matches_torch(backend):
    # The article's use: a cell stepped over time by hand, gradients through every step.
    ref, ours = cell_pair(backend, I, H)

    class Unroll(torch.nn.Module):
        def __init__(self, cell):
            super().__init__()
            self.cell = cell

        def forward(self, x, h):
            outs = []
            for x_t in x:
                h = self.cell(x_t, h)
                outs.append(h)
            return torch.stack(outs), h

    def make():
        g = torch.Generator().manual_seed(5)
        x = torch.randn(6, 2, I, generator=g, dtype=torch.float64).requires_grad_()
        h = torch.randn(2, H, generator=g, dtype=torch.float64).requires_grad_()
        return (x, h), [x, h]

    check_module(Unroll(ref), Unroll(ours), make, torch.float64)
