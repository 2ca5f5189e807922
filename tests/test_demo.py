"""The article's experiment: data shapes, and that training works on every backend as on torch.nn."""

import numpy as np
import pytest
import torch

from myrnn_fast import demo


def test_article_data():
    x, y = demo.make_train_data()
    assert x.shape == (176, 25, 1) and y.shape == (176, 1)
    clean, noisy = demo.make_data()
    assert len(clean) == 201
    assert np.max(np.abs(noisy - clean)) <= demo.NOISE
    # window i holds noisy samples i..i+24; its label is the clean sample i+25
    torch.testing.assert_close(x[10, :, 0].double(), torch.tensor(noisy[10:35]), check_dtype=False, atol=1e-6, rtol=0)
    assert y[10, 0].item() == pytest.approx(clean[35], abs=1e-6)


def test_same_training_trajectory_as_torch_nn(backend):
    ours = demo.run(backend, epochs=3, seed=1)
    baseline = demo.run(demo.BASELINE, epochs=3, seed=1)
    np.testing.assert_allclose(ours.losses, baseline.losses, rtol=1e-4)
    assert ours.backend == backend


def test_default_run_learns_the_sine():
    result = demo.run("auto")  # the article's settings: 100 epochs, SGD lr 0.05
    assert result.epochs == 100 and len(result.losses) == 100
    assert result.final_loss < 0.02
    assert result.losses[-1] < result.losses[0] / 20


@pytest.mark.slow
def test_default_run_learns_the_sine_on_every_backend(backend):
    assert demo.run(backend).final_loss < 0.02
