"""``RemoteOptimizer(overlap=True)``: steps sent from backward give the parameters and the
state of ``overlap=False`` bit for bit (local://, shm://, http://), and what would make them
differ (gradients changed or accumulated after they were sent, a late lr) raises."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from stepd.client.torch import RemoteOptimizer  # noqa: E402

from tests.support.server import ShmServer  # noqa: E402

LOCAL = "local://?backend=cpu"
HP = {"lr": 0.05, "betas": (0.9, 0.99), "weight_decay": 0.01}
STEPS = 12
# one bucket per tensor, a few tensors per bucket, everything left for step()
BUCKETS = [1e-9, 1e-3, 25.0]


class Net(torch.nn.Module):
    """Three layers, a side layer used on odd iterations only (its grad is None, or zero,
    on even ones) and a frozen tensor."""

    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.a = torch.nn.Linear(8, 32)
        self.b = torch.nn.Linear(32, 32)
        self.c = torch.nn.Linear(32, 1)
        self.side = torch.nn.Linear(32, 1)
        self.frozen = torch.nn.Parameter(torch.ones(3), requires_grad=False)
        self.to(dtype)

    def forward(self, x: torch.Tensor, t: int) -> torch.Tensor:
        h = torch.tanh(self.b(torch.tanh(self.a(x))))
        out = self.c(h)
        return out + self.side(h) if t % 2 else out


def groups(net: Net) -> list[dict[str, Any]]:
    named = list(net.named_parameters())
    return [
        {"params": [(n, p) for n, p in named if not n.endswith("bias")]},
        {"params": [(n, p) for n, p in named if n.endswith("bias")], "weight_decay": 0.0},
    ]


def batch(t: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(t)
    x = torch.randn(16, 8, generator=g)
    return x.to(dtype), (x.sum(1, keepdim=True) * 0.3).to(dtype)


def train(
    url: str,
    *,
    algorithm: str = "adamw",
    hp: dict[str, Any] = HP,
    dtype: torch.dtype = torch.float32,
    micro: int = 1,
    set_to_none: bool = True,
    closure: bool = False,
    **options: Any,
) -> tuple[list[torch.Tensor], dict[str, Any]]:
    """The parameters and the state after STEPS iterations of ``micro`` accumulated
    backward passes each, with an lr schedule."""
    net = Net(dtype)
    opt = RemoteOptimizer(groups(net), url, algorithm, **hp, **options)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    for t in range(STEPS):

        def backward(t: int = t) -> torch.Tensor:
            opt.zero_grad(set_to_none)
            for k in range(micro):
                x, y = batch(t * micro + k, dtype)
                if k < micro - 1:
                    with opt.no_sync():
                        torch.nn.functional.mse_loss(net(x, t), y).backward()
                else:
                    loss = torch.nn.functional.mse_loss(net(x, t), y)
                    loss.backward()
            return loss

        if closure:
            opt.step(backward)
        else:
            backward()
            opt.step()
        sched.step()
    state = opt.state_dict()
    opt.close()
    return [p.detach().clone() for p in net.parameters()], state


def assert_equal(got: tuple, want: tuple) -> None:
    (params, state), (want_params, want_state) = got, want
    for p, q in zip(params, want_params, strict=True):
        assert torch.equal(p, q)
    assert state["stepd"] == want_state["stepd"]
    assert state["state"].keys() == want_state["state"].keys()
    for i, entry in state["state"].items():
        assert entry.keys() == want_state["state"][i].keys()
        for slot, value in entry.items():
            assert torch.equal(value, want_state["state"][i][slot]), (i, slot)


@pytest.mark.parametrize("bucket_cap_mb", BUCKETS)
@pytest.mark.parametrize("set_to_none", [True, False])
def test_bit_identical_in_process(bucket_cap_mb: float, set_to_none: bool) -> None:
    want = train(LOCAL, set_to_none=set_to_none)
    got = train(LOCAL, set_to_none=set_to_none, overlap=True, bucket_cap_mb=bucket_cap_mb)
    assert_equal(got, want)


@pytest.mark.parametrize(
    ("algorithm", "hp"),
    [
        # torch's NAdam: L2 decay added to the gradient here, negated for maximize
        ("nadamw", {"lr": 0.01, "weight_decay": 0.1, "maximize": True}),
        ("sgd", {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01}),
        ("lion", {"lr": 0.01, "weight_decay": 0.1}),
    ],
)
def test_bit_identical_per_algorithm(algorithm: str, hp: dict[str, Any]) -> None:
    want = train(LOCAL, algorithm=algorithm, hp=hp)
    assert_equal(train(LOCAL, algorithm=algorithm, hp=hp, overlap=True, bucket_cap_mb=1e-9), want)


def test_accumulation_in_no_sync_and_closures() -> None:
    want = train(LOCAL, micro=3)
    assert_equal(train(LOCAL, micro=3, overlap=True, bucket_cap_mb=1e-9), want)
    assert_equal(train(LOCAL, closure=True, overlap=True, bucket_cap_mb=1e-3), train(LOCAL))


def one_backward(opt: RemoteOptimizer, net: Net, t: int = 1) -> None:
    x, y = batch(t)
    torch.nn.functional.mse_loss(net(x, t), y).backward()


def test_what_would_differ_raises() -> None:
    net = Net()
    with RemoteOptimizer(groups(net), LOCAL, overlap=True, bucket_cap_mb=1e-9, **HP) as opt:
        one_backward(opt, net)
        with pytest.raises(RuntimeError, match="accumulated again"):
            one_backward(opt, net)  # a second backward into sent gradients
        with pytest.raises(RuntimeError, match="call step\\(\\) first"):
            opt.zero_grad()
        with pytest.raises(RuntimeError, match="'lr' changed after backward"):
            opt.param_groups[0]["lr"] = 0.01
        assert opt.param_groups[0]["lr"] == HP["lr"]  # refused: nothing stored
        opt.param_groups[0]["lr"] = HP["lr"]  # the same value is no change
        with pytest.raises(RuntimeError, match="call step\\(\\) first"):
            opt.state_dict()
        with pytest.raises(RuntimeError, match="changed after backward sent them"):
            opt.step()  # the second backward accumulated into a sent gradient
        opt.zero_grad()
        one_backward(opt, net)
        opt.step()
        opt.zero_grad()
        one_backward(opt, net)
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1e-3)
        with pytest.raises(RuntimeError, match="changed after backward sent them"):
            opt.step()
        opt.zero_grad()  # the optimizer goes on after the error
        one_backward(opt, net)
        opt.step()
        assert opt.state_dict()["stepd"]["global_step"] == 2  # the failed step did not count


def test_without_overlap_nothing_is_sent_in_backward() -> None:
    net = Net()
    with RemoteOptimizer(groups(net), LOCAL, **HP) as opt:
        before = [p.detach().clone() for p in net.parameters()]
        with opt.no_sync():  # accepted, and nothing to pause
            one_backward(opt, net)
        one_backward(opt, net)
        assert all(torch.equal(p, q) for p, q in zip(net.parameters(), before, strict=True))
        opt.step()


def test_arguments() -> None:
    net = Net()
    with pytest.raises(ValueError, match="Invalid bucket_cap_mb: 0"):
        RemoteOptimizer(net.parameters(), LOCAL, overlap=True, bucket_cap_mb=0)
    with pytest.raises(TypeError, match="overlap must be a bool"):
        RemoteOptimizer(net.parameters(), LOCAL, overlap=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="overlap=False with sync workers"):
        RemoteOptimizer(
            net.parameters(),
            LOCAL,
            overlap=True,
            run="r",
            worker="0",
            workers={"mode": "sync", "count": 2},
        )


@pytest.fixture(scope="module")
def srv() -> Iterator[ShmServer]:
    with ShmServer() as s:
        yield s


@pytest.mark.e2e
@pytest.mark.parametrize("kind", ["shm", "http"])
@pytest.mark.parametrize("bucket_cap_mb", [1e-9, 1e-3])
def test_bit_identical_over_servers(srv: ShmServer, kind: str, bucket_cap_mb: float) -> None:
    url = srv.shm_url if kind == "shm" else srv.url
    want = train(url)
    assert_equal(train(url, overlap=True, bucket_cap_mb=bucket_cap_mb), want)
    want = train(url, micro=2, set_to_none=False)
    assert_equal(train(url, micro=2, set_to_none=False, overlap=True, bucket_cap_mb=1e-3), want)


@pytest.mark.e2e
def test_named_run_over_http(srv: ShmServer) -> None:
    """Both groups in one named run: its step advanced once per iteration either way."""
    want = train(srv.url, run="overlap", fresh=True)
    got = train(srv.url, run="overlap", fresh=True, overlap=True, bucket_cap_mb=1e-3)
    assert_equal(got, want)
    assert got[1]["stepd"]["global_step"] == STEPS


@pytest.mark.e2e
def test_bfloat16_model_over_http(srv: ShmServer) -> None:
    """bfloat16 gradients on the wire, float32 masters on the server."""
    want = train(srv.url, dtype=torch.bfloat16)
    assert_equal(train(srv.url, dtype=torch.bfloat16, overlap=True, bucket_cap_mb=1e-3), want)


def test_buckets_are_sent_from_backward(monkeypatch: pytest.MonkeyPatch) -> None:
    net = Net()
    with RemoteOptimizer(groups(net), LOCAL, overlap=True, bucket_cap_mb=1e-3, **HP) as opt:
        calls: list[tuple[str, list[str]]] = []
        for remote in opt.remotes:
            send = remote.step_batch

            def record(items: list, last: bool = False, send: Any = send) -> None:
                calls.append((threading.current_thread().name, [it[0] for it in items]))
                send(items, last)

            monkeypatch.setattr(remote, "step_batch", record)
        one_backward(opt, net)
        opt.step()
    sent = [names for thread, names in calls if thread.startswith("stepd-overlap")]
    # 1 KiB buckets, per group, filled in the order backward finishes the gradients
    # (side.weight and c.weight 128 B, b.weight 4 KiB, a.weight 1 KiB); each tensor once
    weights = [names for names in sent if names[0].endswith("weight")]
    assert weights == [["side.weight", "c.weight", "b.weight"], ["a.weight"]]
    names = [n for batch in sent for n in batch]
    assert sorted(names) == sorted(n for n, p in net.named_parameters() if p.requires_grad)


def test_a_failed_bucket_raises_at_step(monkeypatch: pytest.MonkeyPatch) -> None:
    net = Net()
    with RemoteOptimizer(groups(net), LOCAL, overlap=True, bucket_cap_mb=1e-9, **HP) as opt:
        send = opt.remote.step_batch

        def fail(items: list, last: bool = False) -> None:
            raise ConnectionError("the server went away")

        monkeypatch.setattr(opt.remote, "step_batch", fail)
        one_backward(opt, net)
        with pytest.raises(ConnectionError, match="went away"):
            opt.step()
        monkeypatch.setattr(opt.remote, "step_batch", send)
        opt.zero_grad()  # the iteration is over: the optimizer goes on
        one_backward(opt, net)
        opt.step()


def test_bit_identical_transformer_encoder() -> None:
    """Attention's packed projections, layer norms, weights used twice per layer."""

    def train_encoder(**options: Any) -> tuple[list[torch.Tensor], dict[str, Any]]:
        torch.manual_seed(2)
        layer = torch.nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        net = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        opt = RemoteOptimizer(net.named_parameters(), LOCAL, "adamw", **HP, **options)
        for t in range(6):
            opt.zero_grad()
            x = torch.randn(4, 8, 16, generator=torch.Generator().manual_seed(t))
            net(x).square().mean().backward()
            opt.step()
        state = opt.state_dict()
        opt.close()
        return [p.detach().clone() for p in net.parameters()], state

    assert_equal(train_encoder(overlap=True, bucket_cap_mb=1e-3), train_encoder())
