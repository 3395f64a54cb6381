"""RemoteOptimizer under Lightning: ``configure_optimizers`` returns one (with a per-step lr
scheduler), the Trainer's ``ModelCheckpoint`` writes ``.ckpt`` files and ``fit(ckpt_path=)``
resumes from one; checkpoints load with torch.load's default ``weights_only=True``.

Oracle: the same module and Trainer with ``torch.optim.AdamW`` (same seed and data): every
step's loss within rtol 1e-5, final parameters within 1e-5 (relative, 2-norm). A fit resumed
from step 4 in a fresh Trainer and module equals the uninterrupted one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
L = pytest.importorskip("lightning")

from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from stepd.client.torch import RemoteOptimizer  # noqa: E402

# Each fit writes its own folder: Lightning's notice that a resumed ModelCheckpoint moved is noise
pytestmark = pytest.mark.filterwarnings("ignore:The dirpath has changed")

LOCAL = "local://?backend=cpu"
HP: dict[str, Any] = {"lr": 0.02, "betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": 0.01}
STEPS, SAVE = 8, 4  # 4 batches an epoch: the checkpoint is at an epoch's end


class Regressor(L.LightningModule):
    """``url=None``: torch.optim.AdamW; else a RemoteOptimizer on that server."""

    def __init__(self, url: str | None = None, seed: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()  # plain values in the .ckpt: load_from_checkpoint rebuilds
        torch.manual_seed(seed)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)
        )
        self.losses: list[float] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self) -> dict[str, Any]:
        url = self.hparams["url"]
        if url is None:
            opt: torch.optim.Optimizer = torch.optim.AdamW(self.parameters(), **HP)
        else:
            opt = RemoteOptimizer(self.named_parameters(), url, algorithm="adamw", **HP)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 - t / (2 * STEPS))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def loader() -> torch.utils.data.DataLoader:
    # In order: Lightning restarts an epoch's sampler on resume, so a shuffled epoch would
    # differ between the runs for torch.optim too.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=g)
    y = x @ torch.randn(8, 1, generator=g) + 0.3
    data = torch.utils.data.TensorDataset(x, y)
    return torch.utils.data.DataLoader(data, batch_size=16, shuffle=False)


def fit(module: Regressor, out: Path, ckpt: Path | None = None) -> L.Trainer:
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(
        max_steps=STEPS,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=True,
        callbacks=[ModelCheckpoint(dirpath=out, every_n_train_steps=SAVE, save_top_k=-1)],
        default_root_dir=out,
    )
    trainer.fit(module, loader(), ckpt_path=ckpt)  # torch.load's default weights_only
    return trainer


def flat(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in module.parameters()])


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def close(trainer: L.Trainer) -> None:
    for opt in trainer.optimizers:
        if isinstance(opt, RemoteOptimizer):
            opt.close()


def test_fit_matches_adamw_and_resumes(tmp_path: Path) -> None:
    want = Regressor()
    fit(want, tmp_path / "adamw")
    assert relative(flat(want), flat(Regressor())) > 0.05  # it trained

    got = Regressor(LOCAL)
    first = fit(got, tmp_path / "full")
    assert got.losses == pytest.approx(want.losses, rel=1e-5)
    assert len(got.losses) == STEPS
    assert relative(flat(got), flat(want)) <= 1e-5
    close(first)  # the resumed fit owes nothing to this optimizer's server state

    ckpt = tmp_path / "full" / f"epoch=0-step={SAVE}.ckpt"
    saved = torch.load(ckpt, weights_only=True)
    [opt_state] = saved["optimizer_states"]
    assert {"exp_avg", "exp_avg_sq", "step"} <= set(opt_state["state"][0])
    assert float(opt_state["state"][0]["step"]) == SAVE

    # A module of another init and a fresh optimizer: weights, moments, step counts and the
    # scheduler come back from the checkpoint.
    resumed = Regressor(LOCAL, seed=7)
    second = fit(resumed, tmp_path / "resumed", ckpt=ckpt)
    assert resumed.losses == pytest.approx(got.losses[SAVE:], rel=1e-6)
    assert relative(flat(resumed), flat(got)) <= 1e-6
    close(second)


def test_resumes_a_torch_adamw_checkpoint(tmp_path: Path) -> None:
    # optimizer_states written by torch.optim.AdamW, loaded into a RemoteOptimizer by Lightning
    want = Regressor()
    fit(want, tmp_path / "adamw")
    ckpt = tmp_path / "adamw" / f"epoch=0-step={SAVE}.ckpt"
    resumed = Regressor(LOCAL, seed=7)
    trainer = fit(resumed, tmp_path / "resumed", ckpt=ckpt)
    assert resumed.losses == pytest.approx(want.losses[SAVE:], rel=1e-5)
    assert relative(flat(resumed), flat(want)) <= 1e-5
    close(trainer)


def test_load_from_checkpoint_for_inference(tmp_path: Path) -> None:
    trained = Regressor(LOCAL)
    close(fit(trained, tmp_path))
    ckpt = tmp_path / f"epoch=1-step={STEPS}.ckpt"
    model = Regressor.load_from_checkpoint(ckpt)  # torch.load's default weights_only
    assert model.hparams["url"] == LOCAL
    model.eval()
    x = torch.randn(5, 8)
    with torch.no_grad():
        assert torch.equal(model(x), trained(x))
