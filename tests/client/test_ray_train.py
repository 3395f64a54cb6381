"""The Ray Train example on a local Ray cluster: two TorchTrainer workers, two stepd shards
(Ray actors), one sync group. Both ranks end with the same weights, equal to one process
training torch's AdamW on the union of their batches."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytestmark = pytest.mark.e2e

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
STEPS = 6


def _single_process(example: Any) -> np.ndarray:
    import torch

    model = example.make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=example.LR)  # torch's defaults = stepd's
    for step in range(STEPS):
        x, y = example.global_batch(step)
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return torch.cat([p.detach().flatten() for p in model.parameters()]).numpy()


def test_ray_train_workers_share_one_optimizer(tmp_path: Path) -> None:
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.train.torch")
    pytest.importorskip("torch")
    # the workers import the example by name: its folder on the path of every Ray process
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(EXAMPLES), saved]))
    sys.path.insert(0, str(EXAMPLES))
    try:
        import ray_train_sync as example

        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            example.train(2, 2, STEPS, str(tmp_path / "checkpoints"), out=str(tmp_path))
        finally:
            ray.shutdown()
    finally:
        sys.path.remove(str(EXAMPLES))
        if saved is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = saved

    rank0 = np.fromfile(tmp_path / "rank0.f32", np.float32)
    rank1 = np.fromfile(tmp_path / "rank1.f32", np.float32)
    np.testing.assert_array_equal(rank0, rank1)  # one sync group: the very same weights
    expected = _single_process(example)
    assert not np.array_equal(rank0, _initial(example))  # it trained
    # the shards average the two halves' gradients (float32 rounding apart from the whole
    # batch's gradient), then step AdamW as torch does
    np.testing.assert_allclose(rank0, expected, rtol=0, atol=2e-6)


def _initial(example: Any) -> np.ndarray:
    import torch

    return torch.cat([p.detach().flatten() for p in example.make_model().parameters()]).numpy()
