"""RemoteOptimizer under accelerate: ``Accelerator.prepare`` wraps it (with a scheduler and a
dataloader), ``accumulate`` steps it every second micro-batch, and ``save_state`` /
``load_state`` carry a run across a fresh Accelerator, model and optimizer mid-epoch.

Oracle: the same loop with ``torch.optim.AdamW`` (same seed and data): every micro-batch's
loss within rtol 1e-5, final parameters within 1e-5 (relative, 2-norm). The resumed run
equals the uninterrupted one."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("accelerate")

from accelerate import Accelerator  # noqa: E402
from stepd.client.torch import RemoteOptimizer  # noqa: E402

LOCAL = "local://?backend=cpu"
HP: dict[str, Any] = {"lr": 0.02, "betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": 0.01}
ACCUMULATE = 2
BATCHES, EPOCHS = 8, 2  # micro-batches an epoch
SAVE = 10  # micro-batches done when the state is saved: in the second epoch, at a sync point
STEPS = BATCHES * EPOCHS // ACCUMULATE  # optimizer steps

OptFactory = Callable[[torch.nn.Module], torch.optim.Optimizer]


@dataclass
class Run:
    losses: list[float]
    model: torch.nn.Module
    opt: Any  # accelerate's AcceleratedOptimizer


def data() -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8 * BATCHES, 8, generator=g)
    return torch.utils.data.TensorDataset(x, x @ torch.randn(8, 1, generator=g) + 0.3)


def net(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))


def run(make_opt: OptFactory, save: Path | None = None, resume: Path | None = None) -> Run:
    """Train ``EPOCHS`` epochs; ``save``: ``save_state`` there after ``SAVE`` micro-batches;
    ``resume``: a fresh model (another init) and optimizer, ``load_state`` from there, and
    the rest of the run."""
    acc = Accelerator(gradient_accumulation_steps=ACCUMULATE, cpu=True)
    model = net(seed=0 if resume is None else 7)
    opt = make_opt(model)
    dl = torch.utils.data.DataLoader(data(), batch_size=8, shuffle=False)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 - t / (2 * STEPS))
    model, opt, dl, sched = acc.prepare(model, opt, dl, sched)
    done = 0
    if resume is not None:
        acc.load_state(str(resume))
        done = SAVE
    losses = []
    for epoch in range(EPOCHS):
        if done >= (epoch + 1) * BATCHES:
            continue
        batches = acc.skip_first_batches(dl, done - epoch * BATCHES) if done else dl
        for x, y in batches:
            with acc.accumulate(model):
                loss = torch.nn.functional.mse_loss(model(x), y)
                losses.append(loss.item())
                acc.backward(loss)
                opt.step()  # a no-op (accelerate's) but every ACCUMULATE-th micro-batch
                sched.step()
                opt.zero_grad()
            done += 1
            if done == SAVE and save is not None:
                acc.save_state(str(save))
    return Run(losses, model, opt)


def flat(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in module.parameters()])


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def remote(m: torch.nn.Module, url: str = LOCAL) -> torch.optim.Optimizer:
    return RemoteOptimizer(m.named_parameters(), url, algorithm="adamw", **HP)


def adamw(m: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(m.parameters(), **HP)


def test_accumulation_and_state_match_adamw(tmp_path: Path) -> None:
    want = run(adamw)
    assert relative(flat(want.model), flat(net())) > 0.05  # it trained

    got = run(remote, save=tmp_path)
    assert got.losses == pytest.approx(want.losses, rel=1e-5)
    assert len(got.losses) == BATCHES * EPOCHS
    assert relative(flat(got.model), flat(want.model)) <= 1e-5
    inner = got.opt.optimizer
    assert isinstance(inner, RemoteOptimizer)
    # one server step per ACCUMULATE micro-batches, as torch's per-parameter count
    assert float(inner.state_dict()["state"][0]["step"]) == STEPS
    # accelerate's own load allows numpy globals; the file needs none
    saved = torch.load(tmp_path / "optimizer.bin", weights_only=True)
    assert float(saved["state"][0]["step"]) == SAVE // ACCUMULATE
    inner.close()  # the resumed run owes nothing to this optimizer's server state

    resumed = run(remote, resume=tmp_path)
    assert resumed.losses == pytest.approx(got.losses[SAVE:], rel=1e-6)
    assert relative(flat(resumed.model), flat(got.model)) <= 1e-6
    resumed.opt.optimizer.close()


def test_resumes_a_torch_adamw_state(tmp_path: Path) -> None:
    # optimizer.bin written by torch.optim.AdamW, loaded into a RemoteOptimizer by accelerate
    want = run(adamw, save=tmp_path)
    resumed = run(remote, resume=tmp_path)
    assert resumed.losses == pytest.approx(want.losses[SAVE:], rel=1e-5)
    assert relative(flat(resumed.model), flat(want.model)) <= 1e-5
    resumed.opt.optimizer.close()


@pytest.mark.e2e
def test_resume_over_http(tmp_path: Path, shared_server: Any) -> None:
    def over_http(m: torch.nn.Module) -> torch.optim.Optimizer:
        return remote(m, shared_server.url)

    want = run(adamw)
    got = run(over_http, save=tmp_path)
    got.opt.optimizer.close()
    try:  # the uninterrupted run first: a mismatch there says more than one after resuming
        assert got.losses == pytest.approx(want.losses, rel=1e-5)
    except AssertionError as e:
        pytest.fail(f"the uninterrupted run differs from torch.optim.AdamW's: {e}")
    resumed = run(over_http, resume=tmp_path)
    resumed.opt.optimizer.close()
    assert resumed.losses == pytest.approx(got.losses[SAVE:], rel=1e-6)
    assert relative(flat(resumed.model), flat(got.model)) <= 1e-6
