"""RemoteOptimizer under ``transformers.Trainer``: a tiny GPT-2 trains and resumes through the
Trainer's own checkpoints (``optimizer.pt`` / ``scheduler.pt`` read back with
``torch.load(weights_only=True)``, ``model.safetensors``).

Oracle: the same Trainer run with ``torch.optim.AdamW`` (same seed and data): every logged
loss within rtol 1e-5, final parameters within 1e-5 (relative, 2-norm). A run resumed from
step 6 in a fresh Trainer, model and optimizer equals the uninterrupted one."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from stepd.client.torch import RemoteOptimizer  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments  # noqa: E402

LOCAL = "local://?backend=cpu"
HP: dict[str, Any] = {"lr": 1e-2, "betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": 0.01}
STEPS, SAVE = 12, 6
VOCAB, LENGTH = 64, 16

OptFactory = Callable[[torch.nn.Module], torch.optim.Optimizer]


def gpt2(seed: int = 0) -> GPT2LMHeadModel:
    # no dropout: the comparison is about the optimizer, not the Trainer's RNG bookkeeping
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=VOCAB,
        n_positions=32,
        n_embd=16,
        n_layer=1,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(config)


def dataset() -> list[dict[str, torch.Tensor]]:
    """Arithmetic token sequences (start, stride): learnable, so the loss visibly falls."""
    g = torch.Generator().manual_seed(1)
    starts = torch.randint(0, VOCAB, (48, 1), generator=g)
    strides = torch.randint(1, 4, (48, 1), generator=g)
    ids = (starts + strides * torch.arange(LENGTH)) % VOCAB
    return [{"input_ids": row, "labels": row} for row in ids]


def arguments(out: Path) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(out),
        max_steps=STEPS,
        save_steps=SAVE,
        logging_steps=1,
        per_device_train_batch_size=4,
        # the optimizer_cls_and_kwargs form: the decay group's weight decay, and the Trainer's
        # own scheduler (linear from learning_rate, with warmup)
        learning_rate=HP["lr"],
        weight_decay=HP["weight_decay"],
        warmup_steps=2,
        seed=0,
        report_to=[],
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )


def linear(opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 - t / STEPS)


def trainer(out: Path, make_opt: OptFactory | None = None, seed: int = 0, **kw: Any) -> Trainer:
    """``make_opt``: the ``optimizers=(opt, scheduler)`` form; else ``kw`` chooses."""
    model = gpt2(seed)
    if make_opt is not None:
        opt = make_opt(model)
        kw["optimizers"] = (opt, linear(opt))
    return Trainer(model=model, args=arguments(out), train_dataset=dataset(), **kw)


def losses(t: Trainer) -> list[float]:
    return [entry["loss"] for entry in t.state.log_history if "loss" in entry]


def params(t: Trainer) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in t.model.parameters()])


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def remote_of(t: Trainer) -> RemoteOptimizer:
    """The Trainer wraps its optimizer (accelerate's AcceleratedOptimizer)."""
    opt = t.optimizer
    while not isinstance(opt, RemoteOptimizer):
        opt = opt.optimizer
    return opt


def train(t: Trainer, resume: Path | None = None) -> Trainer:
    t.train(resume_from_checkpoint=str(resume) if resume is not None else None)
    return t


def assert_same_run(got: Trainer, want: Trainer, rtol: float) -> None:
    assert losses(got) == pytest.approx(losses(want), rel=rtol)
    assert len(losses(got)) == STEPS
    assert relative(params(got), params(want)) <= rtol


def remote_adamw(url: str = LOCAL) -> OptFactory:
    return lambda m: RemoteOptimizer(m.named_parameters(), url, algorithm="adamw", **HP)


def torch_adamw(m: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(m.parameters(), **HP)


@pytest.fixture(scope="module")
def oracle(tmp_path_factory: pytest.TempPathFactory) -> tuple[Trainer, Path]:
    """The torch.optim.AdamW run and its folder (checkpoint-6 and checkpoint-12)."""
    out = tmp_path_factory.mktemp("adamw")
    t = train(trainer(out, torch_adamw))
    first, last = losses(t)[:3], losses(t)[-3:]
    assert sum(last) < sum(first) - 0.3  # it learns: a frozen model could not match it
    return t, out


def test_optimizers_form_matches_adamw_and_resumes(
    tmp_path: Path, oracle: tuple[Trainer, Path]
) -> None:
    want, _ = oracle
    full = train(trainer(tmp_path / "full", remote_adamw()))
    assert_same_run(full, want, rtol=1e-5)
    ckpt = tmp_path / "full" / f"checkpoint-{SAVE}"
    assert (ckpt / "model.safetensors").is_file()
    saved = torch.load(ckpt / "optimizer.pt", weights_only=True)  # tensors and plain values
    assert {"exp_avg", "exp_avg_sq", "step"} <= set(saved["state"][0])
    assert float(saved["state"][0]["step"]) == SAVE
    remote_of(full).close()  # the resumed run owes nothing to the first one's server state

    # A fresh Trainer, a model of another init and a fresh optimizer: everything comes back
    # from checkpoint-6 (weights, optimizer moments and step counts, scheduler, trainer state).
    resumed = train(trainer(tmp_path / "resumed", remote_adamw(), seed=7), resume=ckpt)
    assert_same_run(resumed, full, rtol=1e-6)
    remote_of(resumed).close()


def test_resume_without_the_optimizer_state_differs(tmp_path: Path) -> None:
    # The control for the resume check: with optimizer.pt gone the Trainer restarts the moments
    # and step counts, and the losses after step 6 are no longer the uninterrupted run's.
    full = train(trainer(tmp_path / "full", remote_adamw()))
    ckpt = tmp_path / "full" / f"checkpoint-{SAVE}"
    (ckpt / "optimizer.pt").unlink()
    resumed = train(trainer(tmp_path / "resumed", remote_adamw()), resume=ckpt)
    assert losses(resumed)[: SAVE + 1] == losses(full)[: SAVE + 1]
    assert losses(resumed)[SAVE + 1 :] != pytest.approx(losses(full)[SAVE + 1 :], rel=1e-4)
    remote_of(full).close()
    remote_of(resumed).close()


def test_resumes_a_torch_adamw_checkpoint(tmp_path: Path, oracle: tuple[Trainer, Path]) -> None:
    # optimizer.pt written by torch.optim.AdamW, loaded into a RemoteOptimizer by the Trainer
    want, out = oracle
    resumed = train(trainer(tmp_path, remote_adamw()), resume=out / f"checkpoint-{SAVE}")
    assert_same_run(resumed, want, rtol=1e-5)
    remote_of(resumed).close()


# The Trainer builds the param groups (decay / no decay for biases and norms) and its own
# scheduler (linear with warmup), then calls RemoteOptimizer(groups, **kwargs).
def remote_cls(url: str = LOCAL) -> tuple[type[RemoteOptimizer], dict[str, Any]]:
    return RemoteOptimizer, {"url": url, "algorithm": "adamw", **HP}


@pytest.fixture(scope="module")
def cls_oracle(tmp_path_factory: pytest.TempPathFactory) -> Trainer:
    out = tmp_path_factory.mktemp("adamw-cls")
    return train(trainer(out, optimizer_cls_and_kwargs=(torch.optim.AdamW, HP)))


def check_cls_form(out: Path, url: str, want: Trainer) -> None:
    full = train(trainer(out / "full", optimizer_cls_and_kwargs=remote_cls(url)))
    opt = remote_of(full)
    assert [g["weight_decay"] for g in opt.param_groups] == [HP["weight_decay"], 0.0]
    assert len(opt.remotes) == 2  # one server group per torch group
    assert_same_run(full, want, rtol=1e-5)
    opt.close()
    ckpt = out / "full" / f"checkpoint-{SAVE}"
    cls = remote_cls(url)
    resumed = train(trainer(out / "resumed", seed=7, optimizer_cls_and_kwargs=cls), resume=ckpt)
    assert_same_run(resumed, full, rtol=1e-6)
    remote_of(resumed).close()


def test_optimizer_cls_and_kwargs_form(tmp_path: Path, cls_oracle: Trainer) -> None:
    check_cls_form(tmp_path, LOCAL, cls_oracle)


@pytest.mark.e2e
def test_over_http(tmp_path: Path, shared_server: Any, cls_oracle: Trainer) -> None:
    # Steps, checkpoint and resume against a real server process. In this form the Trainer
    # loads the checkpoint's weights before it builds the optimizer, so the server registers
    # them.
    check_cls_form(tmp_path, shared_server.url, cls_oracle)


@pytest.mark.e2e
def test_over_http_resume_with_a_prebuilt_optimizer(
    tmp_path: Path, shared_server: Any, oracle: tuple[Trainer, Path]
) -> None:
    want, _ = oracle
    full = train(trainer(tmp_path / "full", remote_adamw(shared_server.url)))
    remote_of(full).close()
    try:  # the uninterrupted run first: a mismatch there says more than one after resuming
        assert_same_run(full, want, rtol=1e-5)
    except AssertionError as e:
        pytest.fail(f"the uninterrupted run differs from torch.optim.AdamW's: {e}")
    ckpt = tmp_path / "full" / f"checkpoint-{SAVE}"
    resumed = train(
        trainer(tmp_path / "resumed", remote_adamw(shared_server.url), seed=7), resume=ckpt
    )
    remote_of(resumed).close()
    assert_same_run(resumed, full, rtol=1e-6)
