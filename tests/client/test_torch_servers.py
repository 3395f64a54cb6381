"""RemoteOptimizer over real servers: http://, shm://, a named run and two shards train like
torch.optim.AdamW (1e-6 after 50 steps), and state moves between transports."""

from __future__ import annotations

import io
from collections.abc import Iterator

import pytest

torch = pytest.importorskip("torch")

from stepd.client.torch import RemoteOptimizer  # noqa: E402

from tests.support.server import Server, ShmServer  # noqa: E402

pytestmark = pytest.mark.e2e  # starts real server processes

HP = {"lr": 0.05, "betas": (0.9, 0.99), "weight_decay": 0.01}
STEPS = 50


@pytest.fixture(scope="module")
def srv() -> Iterator[ShmServer]:
    with ShmServer() as s:
        yield s


def model() -> torch.nn.Module:
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))


def groups(net) -> list[dict]:
    named = list(net.named_parameters())
    return [
        {"params": [(n, p) for n, p in named if n.endswith("weight")]},
        {"params": [(n, p) for n, p in named if n.endswith("bias")], "weight_decay": 0.0},
    ]


def run(first, second=None, switch: int = 20) -> list[torch.Tensor]:
    net = model()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=g)
    y = x @ torch.randn(8, 1, generator=g) + 0.3
    opt = first(net)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.5)
    for t in range(STEPS):
        if t == switch and second is not None:
            buf = io.BytesIO()
            torch.save(opt.state_dict(), buf)
            if isinstance(opt, RemoteOptimizer):
                opt.close()
            opt = second(net)
            buf.seek(0)
            opt.load_state_dict(torch.load(buf))
            sched.optimizer = opt
        opt.zero_grad()
        torch.nn.functional.mse_loss(net(x), y).backward()
        opt.step()
        sched.step()
        if isinstance(opt, RemoteOptimizer):
            assert [r.lr for r in opt.remotes] == [g["lr"] for g in opt.param_groups]
    if isinstance(opt, RemoteOptimizer):
        opt.close()
    return [p.detach().clone() for p in net.parameters()]


def assert_close(got: list, want: list, rtol: float = 1e-6) -> None:
    a, b = torch.cat([t.flatten() for t in got]), torch.cat([t.flatten() for t in want])
    err = float((a - b).norm() / b.norm())
    assert err <= rtol, f"relative error {err:.2e}"


def torch_adamw(net):
    return torch.optim.AdamW(groups(net), **HP)


@pytest.mark.parametrize("kind", ["http", "shm"])
def test_trains_like_torch_over_a_server(srv, kind) -> None:
    url = srv.url if kind == "http" else srv.shm_url
    got = run(lambda net: RemoteOptimizer(groups(net), url, "adamw", **HP))
    assert_close(got, run(torch_adamw))


def test_state_moves_between_transports_and_to_torch(srv) -> None:
    want = run(torch_adamw)
    over_http = lambda net: RemoteOptimizer(groups(net), srv.url, "adamw", **HP)  # noqa: E731
    over_shm = lambda net: RemoteOptimizer(groups(net), srv.shm_url, "adamw", **HP)  # noqa: E731
    assert_close(run(over_http, over_shm), want)
    assert_close(run(over_shm, torch_adamw), want)
    assert_close(run(torch_adamw, over_http), want)


def test_groups_share_one_named_run(srv) -> None:
    def named(net):
        return RemoteOptimizer(groups(net), srv.url, "adamw", run="torch-groups", fresh=True, **HP)

    assert_close(run(named), run(torch_adamw))
    with RemoteOptimizer(groups(model()), srv.url, "adamw", run="torch-groups", **HP) as opt:
        # two server groups in the one run, and its step advanced once per iteration
        assert {r.run for r in opt.remotes} == {"torch-groups"}
        assert len({r.session.group_id for r in opt.remotes}) == 2
        assert opt.remote.state_dict()["global_step"] == STEPS


def test_two_shards(tmp_path) -> None:
    servers = [
        Server(tmp_path / f"s{i}", run=None, STEPD_SHARD_INDEX=str(i), STEPD_SHARD_COUNT="2")
        for i in range(2)
    ]
    try:
        urls = [s.url for s in servers]
        got = run(lambda net: RemoteOptimizer(groups(net), urls, "adamw", **HP))
        assert_close(got, run(torch_adamw))
        with RemoteOptimizer(model().named_parameters(), urls, "adamw", **HP) as opt:
            held = [set(s._shapes) for s in opt.remote.shards]
            assert held[0]
            assert held[1]
            assert held[0] | held[1] == {n for n, _ in groups_names()}
    finally:
        for s in servers:
            s.stop()


def groups_names() -> list[tuple[str, torch.Tensor]]:
    return list(model().named_parameters())


def test_shm_cpu_model_lives_in_shared_memory(srv) -> None:
    """Over shm:// a float32 CPU model's parameters and gradients are the segments the
    server steps in place: backward writes into them and a step copies nothing; a caller
    that swaps a gradient (``model.zero_grad()`` sets it to None) falls back to copying."""
    net, want_net = model(), model()
    opt = RemoteOptimizer(net.parameters(), srv.shm_url, "adamw", **HP)
    oracle = torch.optim.AdamW(want_net.parameters(), **HP)
    [link] = opt._links
    segments = {p: (s.param.ctypes.data, s.grad.ctypes.data) for p, s in link.shared.items()}
    assert set(segments) == set(net.parameters())
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=g)
    y = x @ torch.randn(8, 1, generator=g)
    for t in range(STEPS):
        for m, o in ((net, opt), (want_net, oracle)):
            if t % 10 == 9:
                m.zero_grad()  # set_to_none: this step's gradients are new tensors
            else:
                o.zero_grad()
            torch.nn.functional.mse_loss(m(x), y).backward()
            o.step()
        if t % 10 != 9:
            for p, (param_at, grad_at) in segments.items():
                assert (p.data_ptr(), p.grad.data_ptr()) == (param_at, grad_at)
    got = torch.cat([p.detach().flatten() for p in net.parameters()])
    want = torch.cat([p.detach().flatten() for p in want_net.parameters()])
    assert float((got - want).norm() / want.norm()) <= 1e-6
    opt.close()  # the parameters move out of the segments, and stay usable
    assert all(p.data_ptr() != segments[p][0] for p in net.parameters())
    torch.testing.assert_close(net[0].weight.detach(), want_net[0].weight.detach())
