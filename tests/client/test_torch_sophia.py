"""Sophia through RemoteOptimizer: Hutchinson's Hessian-diagonal estimate (torch autograd)
and ``update_hessian``, checked against the exact diagonal and a plain-torch SophiaH."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from stepd.client import InvalidRequestError  # noqa: E402
from stepd.client.torch import RemoteOptimizer, hutchinson  # noqa: E402

LOCAL = "local://?backend=cpu"
SOPHIA = {"lr": 0.02, "betas": (0.9, 0.95), "rho": 0.5, "eps": 1e-12, "weight_decay": 0.01}


def test_hutchinson_is_exact_for_a_diagonal_hessian() -> None:
    d = torch.tensor([1.0, 2.0, -3.0, 0.5])
    x = torch.nn.Parameter(torch.randn(4))
    y = torch.nn.Parameter(torch.randn(2, 2))
    loss = 0.5 * (d * x * x).sum() + (y**3).sum()  # diag(H_y) = 6 y, off-diagonals 0
    est = hutchinson(loss, [x, y], generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(est[x], d)
    torch.testing.assert_close(est[y], 6 * y.detach())
    loss.backward()  # the graph is still there
    assert x.grad is not None


def test_hutchinson_matches_the_diagonal_in_expectation() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(5, 5, generator=g)
    hess = a @ a.T + torch.eye(5)
    x = torch.nn.Parameter(torch.randn(5, generator=g))
    loss = 0.5 * x @ hess @ x
    exact = torch.autograd.functional.hessian(lambda v: 0.5 * v @ hess @ v, x.detach()).diagonal()
    torch.testing.assert_close(exact, hess.diagonal())
    samples = 4000
    est = hutchinson(loss, [x], samples=samples, generator=g)[x]
    # each sample is diag(H) + sum_{j != i} H_ij z_i z_j: variance sum_{j != i} H_ij^2
    off = (hess**2).sum(1) - hess.diagonal() ** 2
    bound = 5 * (off / samples).sqrt()  # five standard deviations
    assert ((est - exact).abs() <= bound).all(), (est, exact, bound)
    one = hutchinson(loss, [x], generator=g)[x]
    assert not torch.allclose(one, exact)  # a single sample is not the diagonal


def sophia_reference(params, steps_data, hess_every):
    """SophiaH's update, in plain torch (kernels/algorithms/sophia.py's formula)."""
    b1, b2 = SOPHIA["betas"]
    lr, rho, eps, wd = SOPHIA["lr"], SOPHIA["rho"], SOPHIA["eps"], SOPHIA["weight_decay"]
    m = [torch.zeros_like(p) for p in params]
    h = [torch.zeros_like(p) for p in params]
    for t, (grads, est) in enumerate(steps_data):
        with torch.no_grad():
            for i, p in enumerate(params):
                if t % hess_every == 0:
                    h[i] += (1 - b2) * (est[i] - h[i])
                p.mul_(1 - lr * wd)
                m[i] += (1 - b1) * (grads[i] - m[i])
                p.add_(-lr * (m[i] / torch.clamp(h[i], min=eps)).clamp(-rho, rho))


def test_sophia_through_remote_optimizer_matches_sophiah() -> None:
    torch.manual_seed(3)
    net = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1))
    start = [p.detach().clone() for p in net.parameters()]
    x = torch.randn(32, 6)
    y = torch.randn(32, 1)
    opt = RemoteOptimizer(net.named_parameters(), LOCAL, "sophia", **SOPHIA)
    gen = torch.Generator().manual_seed(0)
    record = []
    for t in range(50):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(net(x), y)
        est = opt.hutchinson(loss, generator=gen) if t % 5 == 0 else None
        loss.backward()
        if est is not None:
            opt.update_hessian(est)
        params = list(net.parameters())
        record.append(
            (
                [p.grad.clone() for p in params],
                [est[p].clone() for p in params] if est is not None else None,
            )
        )
        opt.step()
    opt.close()
    ref = [p.clone() for p in start]
    sophia_reference(ref, record, 5)
    got = torch.cat([p.detach().flatten() for p in net.parameters()])
    want = torch.cat([p.flatten() for p in ref])
    assert float((got - want).norm() / want.norm()) <= 1e-6
    assert not torch.allclose(got, torch.cat([p.flatten() for p in start]))


def test_other_algorithms_refuse_a_hessian() -> None:
    net = torch.nn.Linear(3, 1)
    opt = RemoteOptimizer(net.parameters(), LOCAL, "adamw")
    loss = net(torch.ones(2, 3)).pow(2).sum()
    with pytest.raises(InvalidRequestError, match="does not take a Hessian"):
        opt.update_hessian(opt.hutchinson(loss))
    with pytest.raises(ValueError, match="not a parameter"):
        opt.update_hessian({torch.zeros(1): torch.zeros(1)})
    opt.close()
