"""RemoteOptimizer trains a torch model exactly like torch.optim.AdamW, with a scheduler."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from stepd.client.torch import RemoteOptimizer  # noqa: E402

HP = {"lr": 0.05, "betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": 0.01}


def data() -> tuple:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=g)
    y = x @ torch.randn(8, 1, generator=g) + 0.3
    return x, y


def train(make_opt, steps: int = 30) -> list[list[np.ndarray]]:
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    opt = make_opt(model)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.5)
    x, y = data()
    trajectory, lrs = [], []
    for _ in range(steps):

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            return loss

        opt.step(closure)
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
        trajectory.append([p.detach().numpy().copy() for p in model.parameters()])
    if isinstance(opt, RemoteOptimizer):
        # the scheduler reached the server (lazily: the lr in force at the last step)
        assert opt.remote.lr == pytest.approx(lrs[-2])
        opt.close()
    return trajectory, lrs


@pytest.mark.parametrize("transport", ["local", "http"])
def test_trajectory_matches_torch_adamw(transport, server) -> None:
    url = "local://?backend=cpu" if transport == "local" else server.url  # fresh global step
    want, want_lrs = train(lambda m: torch.optim.AdamW(m.parameters(), **HP))
    got, got_lrs = train(lambda m: RemoteOptimizer(m.named_parameters(), url, "adamw", **HP))
    assert got_lrs == want_lrs
    assert want_lrs[-1] == pytest.approx(HP["lr"] * 0.125)  # StepLR halved it three times
    for t, (a, b) in enumerate(zip(want, got, strict=True)):
        for pa, pb in zip(a, b, strict=True):
            np.testing.assert_allclose(pb, pa, rtol=1e-5, atol=1e-7, err_msg=f"step {t}")
    assert not np.allclose(want[0][0], want[-1][0])  # it trained


def test_is_a_torch_optimizer_with_state_dict() -> None:
    model = torch.nn.Linear(3, 2)
    opt = RemoteOptimizer(model.named_parameters(), "local://?backend=cpu", "adamw", lr=0.1)
    assert isinstance(opt, torch.optim.Optimizer)
    model(torch.ones(4, 3)).sum().backward()
    opt.step()
    sd = opt.state_dict()
    assert sd["param_groups"][0]["lr"] == 0.1
    assert sd["stepd"]["global_step"] == 1
    assert set(sd["stepd"]["state"]) == {"weight", "bias"}
    after_one = [p.detach().clone() for p in model.parameters()]
    model(torch.ones(4, 3)).sum().backward()
    opt.step()
    opt.load_state_dict(sd)  # back to the remote state after one step
    assert opt.remote.state_dict()["global_step"] == 1
    assert not torch.equal(after_one[0], model.weight)
    opt.close()


def test_only_float32() -> None:
    model = torch.nn.Linear(2, 2).double()
    with pytest.raises(TypeError, match="float32"):
        RemoteOptimizer(model.named_parameters(), "local://")
