"""``myrnn_fast.RNN`` trains under DistributedDataParallel: two processes (gloo, loopback) each
take half of a batch, and their averaged gradients and the parameters after two SGD steps equal
a single process's on the whole batch. The default run covers ``auto`` (what users get); ``-m slow``
covers every available backend, in one pair of processes."""

import datetime
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import myrnn_fast

WORLD = 2
BATCH = 8  # split evenly, so the mean loss of the whole batch is the mean of the halves' losses
STEPS = 2

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


class Regressor(nn.Module):
    """The article's shape of model: an RNN, then a linear head on the last step."""

    def __init__(self, backend):
        super().__init__()
        self.rnn = myrnn_fast.RNN(3, 8, 2, batch_first=True, dtype=torch.float64, backend=backend)
        self.head = nn.Linear(8, 1, dtype=torch.float64)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(BATCH, 5, 3, generator=g, dtype=torch.float64), torch.randn(BATCH, 1, generator=g, dtype=torch.float64)


def _train(model, x, y):
    """Two SGD steps; the first step's gradients and the final parameters."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    first = None
    for _ in range(STEPS):
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        if first is None:
            first = {n: p.grad.clone() for n, p in model.named_parameters()}
        optimizer.step()
    return first, {n: p.detach().clone() for n, p in model.named_parameters()}


def _rank(rank, port, backends, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    x, y = _data()
    mine = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
    results = {}
    for backend in backends:
        torch.manual_seed(0)
        ddp = DistributedDataParallel(Regressor(backend))
        grads, params = _train(ddp, x[mine], y[mine])
        strip = lambda d: {n.removeprefix("module."): t for n, t in d.items()}  # noqa: E731
        results[backend] = (strip(grads), strip(params))
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    # Everything this rank has to say is on disk: skip the teardown. Destroying a gloo process
    # group while its worker thread still releases Python-owned state can deadlock on the GIL
    # (torch's ~ProcessGroupGloo joins that thread with the GIL held); it hung CI once.
    os._exit(0)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    "backends",
    [["auto"], pytest.param(myrnn_fast.available_backends(), marks=pytest.mark.slow)],
    ids=["auto", "every-backend"],
)
def test_ddp_matches_single_process(tmp_path, backends):
    context = mp.start_processes(
        _rank, args=(_free_port(), backends, str(tmp_path)), nprocs=WORLD, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + 300  # a hung rank must fail the test, not stall the suite
    while not context.join(timeout=5):  # raises if a rank failed
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the DDP ranks did not finish within 300 s")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    x, y = _data()
    for backend in backends:
        torch.manual_seed(0)
        grads, params = _train(Regressor(backend), x, y)
        for r, result in enumerate(ranks):
            ddp_grads, ddp_params = result[backend]
            assert ddp_grads.keys() == grads.keys()
            for name in grads:
                torch.testing.assert_close(ddp_grads[name], grads[name], rtol=1e-10, atol=1e-12,
                                           msg=lambda m: f"{backend}, rank {r}, grad of {name}: {m}")
                torch.testing.assert_close(ddp_params[name], params[name], rtol=1e-10, atol=1e-12,
                                           msg=lambda m: f"{backend}, rank {r}, {name} after {STEPS} steps: {m}")
