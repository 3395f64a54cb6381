"""RemoteOptimizer takes what torch.optim takes and trains like it (local://, in process).

Oracle: the torch.optim optimizer of the same update, same seed, parameters within 1e-6
(relative, per tensor) after 50+ steps."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from stepd.client.errors import InvalidRequestError  # noqa: E402
from stepd.client.torch import RemoteOptimizer  # noqa: E402
from stepd.kernels.algorithms import ALGORITHMS  # noqa: E402

LOCAL = "local://?backend=cpu"
HP = {"lr": 0.05, "betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": 0.01}
STEPS = 50


def model() -> torch.nn.Module:
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))


def data() -> tuple:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=g)
    return x, x @ torch.randn(8, 1, generator=g) + 0.3


def train(
    make_opt, steps: int = STEPS, make_sched=None, skip=None, hook=None
) -> list[torch.Tensor]:
    """Train a fresh model; ``skip(t)``: the parameter indices whose grad is None at t;
    ``hook(opt, t)``: changes made to the optimizer before step t."""
    net = model()
    opt = make_opt(net)
    sched = make_sched(opt) if make_sched else None
    x, y = data()
    for t in range(steps):
        opt.zero_grad()
        torch.nn.functional.mse_loss(net(x), y).backward()
        for i in skip(t) if skip else ():
            list(net.parameters())[i].grad = None
        if hook is not None:
            hook(opt, t)
        opt.step()
        if sched is not None:
            sched.step()
            if isinstance(opt, RemoteOptimizer):  # the scheduler's lr is the server's, at once
                assert opt.remote.lr == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12)
    if isinstance(opt, RemoteOptimizer):
        opt.close()
    return [p.detach().clone() for p in net.parameters()]


def assert_close(got: list, want: list, rtol: float = 1e-6) -> None:
    """All parameters as one vector, within ``rtol`` (relative, 2-norm)."""
    assert [a.shape for a in got] == [b.shape for b in want]
    a, b = torch.cat([t.flatten() for t in got]), torch.cat([t.flatten() for t in want])
    err = float((a - b).norm() / b.norm())
    assert err <= rtol, f"relative error {err:.2e}"
    first = model()
    assert not torch.allclose(next(first.parameters()), want[0])  # it trained


def split(net) -> list[dict]:
    """The usual groups: weight decay for weights, none for biases."""
    named = list(net.named_parameters())
    return [
        {"params": [p for n, p in named if n.endswith("weight")]},
        {"params": [p for n, p in named if n.endswith("bias")], "weight_decay": 0.0},
    ]


# -- what torch.optim accepts -----------------------------------------------------------------


@pytest.mark.parametrize("form", ["parameters", "named_parameters", "groups", "named_groups"])
def test_every_form_of_params_trains_like_adamw(form) -> None:
    def params(net):
        if form == "parameters":
            return net.parameters()
        if form == "named_parameters":
            return net.named_parameters()
        groups = split(net)
        if form == "named_groups":
            names = {p: n for n, p in net.named_parameters()}
            for g in groups:
                g["params"] = [(names[p], p) for p in g["params"]]
        return groups

    want = train(lambda m: torch.optim.AdamW(params(m), **HP))
    got = train(lambda m: RemoteOptimizer(params(m), LOCAL, "adamw", **HP))
    assert_close(got, want)


def test_names_and_groups() -> None:
    net = model()
    opt = RemoteOptimizer(split(net), LOCAL, "adamw", **HP)
    assert len(opt.param_groups) == len(opt.remotes) == 2
    assert opt.param_groups[1]["weight_decay"] == 0.0
    assert opt.param_groups[0]["weight_decay"] == 0.01
    assert [g["betas"] for g in opt.param_groups] == [(0.9, 0.99)] * 2  # every hyperparameter
    assert opt.param_groups[0]["eps"] == 1e-8
    net(torch.ones(2, 8)).sum().backward()
    opt.step()
    names = [set(r.state_dict()["state"]) for r in opt.remotes]
    assert names == [{"g0.p0", "g0.p1"}, {"g1.p0", "g1.p1"}]  # group index, position
    opt.close()
    named = RemoteOptimizer(model().named_parameters(), LOCAL, "adamw")
    assert named.param_groups[0]["param_names"] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    named.close()


def test_add_param_group_mid_training() -> None:
    def make(cls, **kw):
        def build(net):
            first, second = next(iter(net.children())), list(net.children())[2]
            opt = cls(first.parameters(), **kw, **HP)
            opt._later = {"params": list(second.parameters()), "lr": 0.02}
            return opt

        return build

    def run(build):
        net = model()
        opt = build(net)
        x, y = data()
        for t in range(STEPS):
            if t == 10:
                opt.add_param_group(opt._later)
            opt.zero_grad()
            torch.nn.functional.mse_loss(net(x), y).backward()
            opt.step()
        if isinstance(opt, RemoteOptimizer):
            assert opt.param_groups[1]["lr"] == 0.02
            assert len(opt.remotes) == 2
            opt.close()
        return [p.detach().clone() for p in net.parameters()]

    got = run(make(RemoteOptimizer, url=LOCAL, algorithm="adamw"))
    want = run(make(torch.optim.AdamW))
    assert_close(got, want)


def test_transformers_trainer_calling_convention() -> None:
    # Trainer(optimizer_cls_and_kwargs=(RemoteOptimizer, kwargs)) calls cls(groups, **kwargs)
    # with groups of bare tensors built from named_parameters() (decay / no decay).
    def groups(net):
        named = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
        return [
            {"params": [p for n, p in named if "bias" not in n], "weight_decay": 0.01},
            {"params": [p for n, p in named if "bias" in n], "weight_decay": 0.0},
        ]

    kwargs = {"url": LOCAL, "algorithm": "adamw", "lr": 0.05, "betas": (0.9, 0.99), "eps": 1e-8}
    got = train(lambda m: RemoteOptimizer(groups(m), **kwargs))
    want = train(lambda m: torch.optim.AdamW(groups(m), lr=0.05, betas=(0.9, 0.99), eps=1e-8))
    assert_close(got, want)
    with pytest.raises(TypeError, match="url"):
        RemoteOptimizer(groups(model()), lr=0.1)


ORACLES = [
    ("sgd", torch.optim.SGD, {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01}),
    ("sgd", torch.optim.SGD, {"lr": 0.05, "momentum": 0.8, "dampening": 0.1}),
    ("sgd", torch.optim.SGD, {"lr": 0.05}),
    ("adam", torch.optim.Adam, {"lr": 0.02, "weight_decay": 0.01}),
    ("radam", torch.optim.RAdam, {"lr": 0.02, "weight_decay": 0.01}),
    ("radam", torch.optim.RAdam, {"lr": 0.02, "weight_decay": 0.1, "decoupled_weight_decay": True}),
    ("nadamw", torch.optim.NAdam, {}),  # torch's defaults, momentum_decay=4e-3 among them
    ("nadamw", torch.optim.NAdam, {"lr": 0.01, "weight_decay": 0.05}),  # L2, torch's default
    (
        "nadamw",
        torch.optim.NAdam,
        {"lr": 0.01, "weight_decay": 0.1, "decoupled_weight_decay": True},
    ),
    ("nadamw", torch.optim.NAdam, {"lr": 0.01, "momentum_decay": 0.01, "betas": (0.8, 0.99)}),
]


@pytest.mark.parametrize(("algorithm", "oracle", "hp"), ORACLES)
def test_trajectory_matches_torch(algorithm, oracle, hp) -> None:
    want = train(lambda m: oracle(split(m), **hp))
    got = train(lambda m: RemoteOptimizer(split(m), LOCAL, algorithm, **hp))
    assert_close(got, want)


def test_nadamw_takes_torchs_defaults() -> None:
    opt = RemoteOptimizer(model().parameters(), LOCAL, "nadamw")
    group = opt.param_groups[0]
    torch_group = torch.optim.NAdam(model().parameters()).param_groups[0]
    for key in ("lr", "betas", "eps", "weight_decay", "momentum_decay", "decoupled_weight_decay"):
        assert group[key] == torch_group[key], key
    opt.close()


# -- torch's argument names --------------------------------------------------------------------


def test_torch_flags_are_accepted_and_ignored() -> None:
    flags = {"foreach": True, "fused": False, "capturable": False, "differentiable": False}
    want = train(lambda m: torch.optim.AdamW(m.parameters(), **HP))
    got = train(lambda m: RemoteOptimizer(m.parameters(), LOCAL, "adamw", **flags, **HP))
    assert_close(got, want)
    opt = RemoteOptimizer(model().parameters(), LOCAL, amsgrad=False, maximize=False)
    assert opt.param_groups[0]["foreach"] is None
    assert opt.param_groups[0]["amsgrad"] is False
    opt.close()


def _server_side(option: str, algorithm: str = "adamw") -> bool:
    return option in ALGORITHMS[algorithm].hyperparams.names()


@pytest.mark.parametrize("option", ["amsgrad", "maximize"])
def test_amsgrad_and_maximize(option) -> None:
    """Refused with a NotImplementedError naming them while the kernels lack them; once an
    algorithm's hyperparameters have them, they go to the server and match torch."""
    if not _server_side(option):
        with pytest.raises(NotImplementedError, match=option):
            RemoteOptimizer(model().parameters(), LOCAL, "adamw", **{option: True})
        with pytest.raises(NotImplementedError, match=option):
            RemoteOptimizer([{"params": model().parameters(), option: True}], LOCAL)
        opt = RemoteOptimizer(model().parameters(), LOCAL)
        with pytest.raises(NotImplementedError, match=option):
            opt.param_groups[0][option] = True
        assert opt.param_groups[0][option] is False
        opt.close()
        return
    hp = {**HP, option: True}
    want = train(lambda m: torch.optim.AdamW(m.parameters(), **hp))
    got = train(lambda m: RemoteOptimizer(m.parameters(), LOCAL, "adamw", **hp))
    assert_close(got, want)


def test_bad_arguments() -> None:
    with pytest.raises(TypeError, match="unknown argument"):
        RemoteOptimizer(model().parameters(), LOCAL, "adamw", momentum=0.9)
    with pytest.raises(ValueError, match="unknown algorithm"):
        RemoteOptimizer(model().parameters(), LOCAL, "adamx")
    with pytest.raises(ValueError, match="decoupled_weight_decay"):
        RemoteOptimizer(model().parameters(), LOCAL, "adam", decoupled_weight_decay=True)
    with pytest.raises(ValueError, match="beta"):
        RemoteOptimizer(model().parameters(), LOCAL, "adamw", betas=(1.5, 0.9))
    with pytest.raises(ValueError, match="invalid parameter name"):
        RemoteOptimizer([("a b", torch.nn.Parameter(torch.ones(2)))], LOCAL)
    with pytest.raises(TypeError, match="float32, bfloat16, float16 or float64"):
        RemoteOptimizer(torch.nn.Linear(2, 2).to(torch.complex64).parameters(), LOCAL)


# -- schedulers --------------------------------------------------------------------------------


SCHEDULERS = [
    ("steplr", lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=10, gamma=0.5)),
    (
        "onecycle",
        lambda o: torch.optim.lr_scheduler.OneCycleLR(
            o, max_lr=0.1, total_steps=STEPS, cycle_momentum=False
        ),
    ),
    (
        "cyclic",
        lambda o: torch.optim.lr_scheduler.CyclicLR(
            o, base_lr=0.01, max_lr=0.1, step_size_up=7, cycle_momentum=False
        ),
    ),
    ("lambda", lambda o: torch.optim.lr_scheduler.LambdaLR(o, [lambda t: 0.97**t, lambda t: 1])),
    # Their defaults cycle beta1 too: a server hyperparameter changed at every step.
    ("onecycle-momentum", lambda o: torch.optim.lr_scheduler.OneCycleLR(o, 0.1, STEPS)),
    ("cyclic-momentum", lambda o: torch.optim.lr_scheduler.CyclicLR(o, 0.01, 0.1, 7)),
]


@pytest.mark.parametrize(("kind", "make_sched"), SCHEDULERS, ids=[s[0] for s in SCHEDULERS])
def test_schedulers(kind, make_sched) -> None:
    want = train(lambda m: torch.optim.AdamW(split(m), **HP), make_sched=make_sched)
    got = train(lambda m: RemoteOptimizer(split(m), LOCAL, "adamw", **HP), make_sched=make_sched)
    assert_close(got, want)


def test_schedulers_reach_the_server_before_the_next_step() -> None:
    opt = RemoteOptimizer(split(model()), LOCAL, "adamw", **HP)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, [lambda t: 0.5**t, lambda t: 0.25**t])
    opt.step()  # no gradients yet: nothing stepped
    sched.step()
    assert [r.lr for r in opt.remotes] == [HP["lr"] * 0.5, HP["lr"] * 0.25]
    opt.param_groups[0]["lr"] = torch.tensor(0.001)  # a tensor lr, as torch allows
    assert opt.remotes[0].lr == pytest.approx(0.001)
    opt.close()


def test_sgd_momentum_cycling_and_a_weight_decay_schedule() -> None:
    """CyclicLR's default cycles SGD's momentum; a hand-written weight-decay schedule and a
    change made behind the group's back (seen before the next step) reach the server too."""

    def make_sched(o):
        return torch.optim.lr_scheduler.CyclicLR(o, base_lr=0.01, max_lr=0.1, step_size_up=5)

    def decay(o, step: int) -> None:
        if step == 20:
            o.param_groups[0]["weight_decay"] = 0.05
        if step == 30:
            dict.update(o.param_groups[-1], {"dampening": 0.1})

    hp = {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.01}
    want = train(lambda m: torch.optim.SGD(split(m), **hp), make_sched=make_sched, hook=decay)
    got = train(
        lambda m: RemoteOptimizer(split(m), LOCAL, "sgd", **hp), make_sched=make_sched, hook=decay
    )
    assert_close(got, want)


def test_a_change_of_the_state_layout_is_refused() -> None:
    opt = RemoteOptimizer(model().parameters(), LOCAL, "adamw", **HP)
    next(iter(opt.param_groups[0]["params"])).grad = torch.ones(4, 8)
    opt.step()  # the state exists now, without a max_exp_avg_sq slot
    with pytest.raises(InvalidRequestError, match="changes the state"):
        opt.param_groups[0]["amsgrad"] = True
    assert opt.param_groups[0]["amsgrad"] is False
    opt.close()


# -- step semantics ----------------------------------------------------------------------------


def test_frozen_parameters_are_not_registered() -> None:
    net = model()
    net[0].weight.requires_grad_(False)
    opt = RemoteOptimizer(net.named_parameters(), LOCAL, "adamw", **HP)
    frozen = net[0].weight.detach().clone()
    x, y = data()
    for _ in range(3):
        opt.zero_grad()
        torch.nn.functional.mse_loss(net(x), y).backward()
        opt.step()
    assert torch.equal(net[0].weight, frozen)
    assert set(opt.remote.state_dict()["state"]) == {"0.bias", "2.weight", "2.bias"}
    assert "0.weight" not in opt.remote.transport._seen  # never sent, not even registered
    opt.close()


@pytest.mark.parametrize(
    ("algorithm", "oracle", "hp"),
    [
        ("sgd", torch.optim.SGD, {"lr": 0.05, "momentum": 0.9}),
        ("adamw", torch.optim.AdamW, HP),
    ],
)
def test_a_parameter_without_grad_is_not_stepped(algorithm, oracle, hp) -> None:
    def skip(t):  # the first layer's bias has no gradient every third iteration
        return [1] if t % 3 == 0 else []

    if algorithm == "adamw" and not _server_side("step_count"):
        pytest.skip("torch counts steps per parameter; these kernels count them per run")
    want = train(lambda m: oracle(m.parameters(), **hp), skip=skip)
    got = train(lambda m: RemoteOptimizer(m.parameters(), LOCAL, algorithm, **hp), skip=skip)
    assert_close(got, want)

    net = model()
    opt = RemoteOptimizer(net.parameters(), LOCAL, algorithm, **hp)
    net(torch.ones(2, 8)).sum().backward()
    net[0].bias.grad = None
    before = net[0].bias.detach().clone()
    opt.step()
    assert torch.equal(net[0].bias, before)
    assert "g0.p1" not in opt.remote.state_dict()["state"]
    opt.close()


def test_sparse_gradients_are_refused_by_name() -> None:
    emb = torch.nn.Embedding(10, 3, sparse=True)
    opt = RemoteOptimizer(emb.named_parameters(), LOCAL)
    before = emb.weight.detach().clone()
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(TypeError, match="'weight': sparse gradients"):
        opt.step()
    assert torch.equal(emb.weight, before)
    opt.close()


def test_closure_and_torch_optimizer() -> None:
    net = model()
    opt = RemoteOptimizer(net.parameters(), LOCAL, "sgd", lr=0.1)
    assert isinstance(opt, torch.optim.Optimizer)
    x, y = data()

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(net(x), y)
        loss.backward()
        return loss.detach()

    first = opt.step(closure)
    assert float(opt.step(closure)) < float(first)
    assert opt.remote.state_dict()["global_step"] == 2
    opt.close()


def test_non_contiguous_parameters_are_written_back() -> None:
    base = torch.zeros(4, 3)
    p = torch.nn.Parameter(base.t())  # a transposed view: not contiguous
    assert not p.is_contiguous()
    opt = RemoteOptimizer([p], LOCAL, "sgd", lr=1.0)
    p.grad = torch.ones(3, 4)
    opt.step()
    np.testing.assert_array_equal(p.detach().numpy(), -np.ones((3, 4), np.float32))
    opt.close()


def test_named_run_groups_with_one_config_share_a_server_group() -> None:
    def same(net):  # two groups, the same hyperparameters: one server group in a named run
        params = list(net.parameters())
        return [{"params": params[:2]}, {"params": params[2:]}]

    run = {"run": "torch-shared", "fresh": True}
    got = train(lambda m: RemoteOptimizer(same(m), LOCAL, "adamw", **run, **HP))
    assert_close(got, train(lambda m: torch.optim.AdamW(same(m), **HP)))
    opt = RemoteOptimizer(same(model()), LOCAL, "adamw", **run, **HP)
    assert len(opt.remotes) == 1
    opt.param_groups[0]["lr"] = 0.01  # the other group still has 0.05: sent at the step if equal
    assert opt.remote.lr == HP["lr"]
    next(iter(opt.param_groups[0]["params"])).grad = torch.ones(4, 8)
    with pytest.raises(ValueError, match="lr must be equal"):
        opt.step()
    opt.param_groups[1]["lr"] = 0.01
    assert opt.remote.lr == 0.01
    opt.close()
