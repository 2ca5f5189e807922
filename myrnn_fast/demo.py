"""The article's experiment: an RNN learns a noisy sine wave and predicts its next value.

The seed article (part 2 of the "作って試そう! ディープラーニング工作室" RNN series) reuses part 1's
data helpers: a sine sampled ``num_div`` times per cycle over ``cycles`` cycles, plus uniform
noise; training windows of ``num_batch`` consecutive noisy samples, each labelled with the clean
sample that follows. With the article's settings that is ``X_train`` of shape ``(176, 25, 1)``,
which the article feeds to the RNN as it stands: sequence length 176, batch 25. The prediction is
``fc(output[:, -1])``, the last batch row's output at every step (row 24 at step t has read the
noisy samples ``t .. t+24`` and is asked for the clean sample ``t+25``), trained full-batch with
MSE and SGD(lr=0.05).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from . import registry
from .modules import RNN

NUM_DIV = 100  # samples per sine period
CYCLES = 2
NUM_BATCH = 25  # window length, used by the article as the batch size
HIDDEN_SIZE = 32
LR = 0.05
EPOCHS = 100
NOISE = 0.02  # half-width of the uniform noise (part 1 of the article; not in the seed text)

BASELINE = "torch.nn"  # demo-only choice: torch's own nn.RNN, for comparison


def make_data(num_div: int = NUM_DIV, cycles: int = CYCLES, rng=None) -> tuple[np.ndarray, np.ndarray]:
    """Clean and noisy sine samples, ``num_div * cycles + 1`` of each."""
    rng = rng if rng is not None else np.random.default_rng(0)
    t = 2 * np.pi / num_div * np.arange(num_div * cycles + 1)
    clean = np.sin(t)
    return clean, clean + rng.uniform(-NOISE, NOISE, size=t.shape)


def make_train_data(num_div: int = NUM_DIV, cycles: int = CYCLES, num_batch: int = NUM_BATCH, rng=None):
    """Windows of ``num_batch`` noisy samples ``[count, num_batch, 1]`` and the clean next value ``[count, 1]``."""
    clean, noisy = make_data(num_div, cycles, rng)
    count = len(clean) - num_batch
    windows = np.stack([noisy[i : i + num_batch] for i in range(count)])
    labels = clean[num_batch : num_batch + count]
    return (
        torch.tensor(windows, dtype=torch.float32).reshape(count, num_batch, 1),
        torch.tensor(labels, dtype=torch.float32).reshape(count, 1),
    )


class Net(torch.nn.Module):
    """The article's model: an RNN, then a linear read-out of the last batch row."""

    def __init__(self, input_size: int, hidden_size: int, output_size: int, backend: str) -> None:
        super().__init__()
        if backend == BASELINE:
            self.rnn = torch.nn.RNN(input_size, hidden_size)
        else:
            self.rnn = RNN(input_size, hidden_size, backend=backend)
        self.fc = torch.nn.Linear(hidden_size, output_size)

    def forward(self, x, hidden):
        output, h = self.rnn(x, hidden)
        return self.fc(output[:, -1]), h


@dataclass
class DemoResult:
    backend: str
    epochs: int
    final_loss: float
    seconds_per_epoch: float
    losses: list[float] = field(default_factory=list)
    prediction: np.ndarray | None = None

    def summary(self) -> dict:
        return {
            "backend": self.backend,
            "epochs": self.epochs,
            "final_loss": self.final_loss,
            "seconds_per_epoch": self.seconds_per_epoch,
        }


def run(
    backend: str = "auto",
    epochs: int = EPOCHS,
    seed: int = 0,
    progress: Callable[[int, int, float, float], None] | None = None,
) -> DemoResult:
    """Train the article's network; ``progress(epoch, epochs, loss, seconds)`` after each epoch."""
    name = backend if backend == BASELINE else registry.resolve_backend("cpu", backend)
    torch.manual_seed(seed)
    x_train, y_train = make_train_data(rng=np.random.default_rng(seed))
    net = Net(1, HIDDEN_SIZE, 1, backend)
    criterion = torch.nn.MSELoss()
    optimizer = torch.optim.SGD(net.parameters(), lr=LR)

    losses, seconds = [], []
    output = None
    for epoch in range(epochs):
        start = time.perf_counter()
        optimizer.zero_grad()
        hidden = torch.zeros(1, NUM_BATCH, HIDDEN_SIZE)
        output, _ = net(x_train, hidden)
        loss = criterion(output, y_train)
        loss.backward()
        optimizer.step()
        seconds.append(time.perf_counter() - start)
        losses.append(loss.item())
        if progress is not None:
            progress(epoch + 1, epochs, losses[-1], seconds[-1])

    return DemoResult(
        backend=name,
        epochs=epochs,
        final_loss=losses[-1] if losses else float("nan"),
        seconds_per_epoch=float(np.mean(seconds)) if seconds else float("nan"),
        losses=losses,
        prediction=None if output is None else output.detach().reshape(-1).numpy(),
    )


def plot(result: DemoResult, out_dir) -> list:
    """Write ``loss.png`` and ``prediction.png`` into ``out_dir``; needs matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from pathlib import Path

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(range(1, len(result.losses) + 1), result.losses)
    ax.set(xlabel="epoch", ylabel="MSE", yscale="log", title=f"training loss ({result.backend})")
    ax.grid(True, which="both", alpha=0.3)
    paths.append(out / "loss.png")
    fig.savefig(paths[-1], dpi=120, bbox_inches="tight")
    plt.close(fig)

    clean, _ = make_data()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(clean, label="sine (truth)")
    if result.prediction is not None:
        ax.plot(range(NUM_BATCH, NUM_BATCH + len(result.prediction)), result.prediction, label="prediction")
    ax.set(xlabel="sample", title=f"prediction after {result.epochs} epochs ({result.backend})")
    ax.legend()
    ax.grid(True, alpha=0.3)
    paths.append(out / "prediction.png")
    fig.savefig(paths[-1], dpi=120, bbox_inches="tight")
    plt.close(fig)
    return paths
