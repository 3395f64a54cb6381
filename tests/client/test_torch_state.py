"""RemoteOptimizer's state_dict is torch.optim's: ``torch.load(weights_only=True)`` reads it,
and state migrates both ways between RemoteOptimizer and the torch.optim optimizer of the
same update, continuing as an uninterrupted torch run would (1e-6 after 50 steps)."""

from __future__ import annotations

import io

import pytest

torch = pytest.importorskip("torch")

from stepd.client.torch import RemoteOptimizer  # noqa: E402

LOCAL = "local://?backend=cpu"
STEPS, SWITCH = 50, 20

CASES = [
    ("adamw", torch.optim.AdamW, {"lr": 0.05, "betas": (0.9, 0.99), "weight_decay": 0.01}),
    ("adam", torch.optim.Adam, {"lr": 0.02, "weight_decay": 0.01}),
    ("sgd", torch.optim.SGD, {"lr": 0.05, "momentum": 0.9, "nesterov": True}),
    ("sgd", torch.optim.SGD, {"lr": 0.05}),
    ("nadamw", torch.optim.NAdam, {"lr": 0.01}),
    ("radam", torch.optim.RAdam, {"lr": 0.02}),
]
IDS = [f"{c[0]}-{i}" for i, c in enumerate(CASES)]


def model() -> torch.nn.Module:
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))


def groups(net) -> list[dict]:
    named = list(net.named_parameters())
    return [
        {"params": [p for n, p in named if n.endswith("weight")]},
        {"params": [p for n, p in named if n.endswith("bias")], "weight_decay": 0.0},
    ]


def saved(sd: dict) -> dict:
    """Through torch.save and torch.load's default (weights_only=True)."""
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf)


def run(first, second=None) -> list[torch.Tensor]:
    """Train with ``first(net)``; at SWITCH move its state into ``second(net)``."""
    net = model()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=g)
    y = x @ torch.randn(8, 1, generator=g) + 0.3
    opt = first(net)
    for t in range(STEPS):
        if t == SWITCH and second is not None:
            sd = saved(opt.state_dict())
            if isinstance(opt, RemoteOptimizer):
                opt.close()
            opt = second(net)
            opt.load_state_dict(sd)
        opt.zero_grad()
        torch.nn.functional.mse_loss(net(x), y).backward()
        opt.step()
    if isinstance(opt, RemoteOptimizer):
        opt.close()
    return [p.detach().clone() for p in net.parameters()]


def assert_close(got: list, want: list, rtol: float = 1e-6) -> None:
    a, b = torch.cat([t.flatten() for t in got]), torch.cat([t.flatten() for t in want])
    err = float((a - b).norm() / b.norm())
    assert err <= rtol, f"relative error {err:.2e}"


@pytest.mark.parametrize(("algorithm", "oracle", "hp"), CASES, ids=IDS)
def test_migrates_from_torch_and_back(algorithm, oracle, hp) -> None:
    def torch_opt(net):
        return oracle(groups(net), **hp)

    def remote(net):
        return RemoteOptimizer(groups(net), LOCAL, algorithm, **hp)

    want = run(torch_opt)
    assert_close(run(torch_opt, remote), want)  # torch.optim -> stepd
    assert_close(run(remote, torch_opt), want)  # stepd -> torch.optim
    assert_close(run(remote, remote), want)  # stepd -> stepd, through weights_only


def test_state_dict_layout() -> None:
    net = model()
    opt = RemoteOptimizer(groups(net), LOCAL, "adamw", lr=0.05)
    net(torch.ones(2, 8)).sum().backward()
    opt.step()
    sd = opt.state_dict()
    want = torch.optim.AdamW(groups(model()), lr=0.05)
    model()(torch.ones(2, 8)).sum().backward()
    assert set(sd) == {"state", "param_groups", "stepd"}
    assert [g["params"] for g in sd["param_groups"]] == [[0, 1], [2, 3]]
    assert set(sd["state"]) == {0, 1, 2, 3}
    assert set(sd["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}
    assert sd["state"][0]["step"].dtype == torch.float32
    assert float(sd["state"][0]["step"]) == 1
    assert sd["state"][0]["exp_avg"].shape == net[0].weight.shape
    for key in want.param_groups[0]:
        if key != "params":
            assert key in sd["param_groups"][0], key
    assert sd["stepd"] == {"algorithm": "adamw", "global_step": 1, "lr_scales": {}}
    saved(sd)  # weights_only loads it
    opt.close()


def test_load_restores_the_groups_options_and_refuses_what_the_server_cannot_change() -> None:
    net = model()
    src = torch.optim.AdamW(groups(net), lr=0.03, betas=(0.9, 0.99))
    net(torch.ones(2, 8)).sum().backward()
    src.step()
    sd = saved(src.state_dict())
    opt = RemoteOptimizer(groups(net), LOCAL, "adamw", lr=0.5, betas=(0.9, 0.99))
    opt.load_state_dict(sd)
    assert [g["lr"] for g in opt.param_groups] == [0.03, 0.03]
    assert [r.lr for r in opt.remotes] == [0.03, 0.03]  # on the server too
    assert opt.remote.state_dict()["global_step"] == 1
    opt.close()

    other = RemoteOptimizer(groups(net), LOCAL, "adamw", lr=0.03)  # betas (0.9, 0.999)
    before = other.state_dict()
    with pytest.raises(NotImplementedError, match="'betas'"):
        other.load_state_dict(sd)
    assert other.state_dict()["state"] == before["state"] == {}
    with pytest.raises(ValueError, match="number of parameter groups"):
        other.load_state_dict({**sd, "param_groups": sd["param_groups"][:1]})
    other.close()


def test_frozen_parameter_state_loads_without_sending_it() -> None:
    net = model()
    src = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net(torch.ones(2, 8)).sum().backward()
    src.step()
    sd = saved(src.state_dict())
    net[0].weight.requires_grad_(False)
    opt = RemoteOptimizer(net.parameters(), LOCAL, "sgd", lr=0.1, momentum=0.9)
    opt.load_state_dict(sd)
    loaded = opt.remote.state_dict()["state"]
    assert set(loaded) == {"g0.p0", "g0.p1", "g0.p2", "g0.p3"}
    torch.testing.assert_close(
        torch.from_numpy(loaded["g0.p0"]["slots"]["momentum_buffer"]),
        sd["state"][0]["momentum_buffer"],
    )
    opt.close()
