"""bfloat16, float16 and float64 models through RemoteOptimizer: float32 master weights and
state on the server, gradients in the model's precision, parameters back rounded to it —
against the same recipe written in torch (AdamW over float32 masters)."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from stepd.client.torch import RemoteOptimizer  # noqa: E402

LOCAL = "local://?backend=cpu"
HP = {"lr": 1e-2, "weight_decay": 0.01}
STEPS = 50


def _model(dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    return net.to(dtype)


def _data(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(32, 8, generator=g).to(dtype), torch.randn(32, 4, generator=g).to(dtype)


def _loss(net, x, y) -> torch.Tensor:
    return torch.nn.functional.mse_loss(net(x).float(), y.float())


def _torch_recipe(dtype: torch.dtype) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Mixed precision by hand: AdamW on float32 masters, the model their rounded copy."""
    net = _model(dtype)
    masters = [p.detach().float().clone().requires_grad_(True) for p in net.parameters()]
    # torch's fused AdamW, the arithmetic our kernel matches bit for bit; its for-loop one
    # (lerp for the momentum) differs by an ulp on some CPUs, which 50 float16 steps amplify
    opt = torch.optim.AdamW(masters, fused=True, **HP)
    x, y = _data(dtype)
    for _ in range(STEPS):
        net.zero_grad()
        _loss(net, x, y).backward()
        for m, p in zip(masters, net.parameters(), strict=True):
            m.grad = p.grad.float()
        opt.step()
        with torch.no_grad():
            for m, p in zip(masters, net.parameters(), strict=True):
                p.copy_(m.to(dtype))  # round to nearest even, as torch rounds
    return [m.detach() for m in masters], [p.detach().clone() for p in net.parameters()]


def _ours(dtype: torch.dtype, url: str, **kw) -> tuple[RemoteOptimizer, list[torch.Tensor]]:
    net = _model(dtype)
    opt = RemoteOptimizer(net.named_parameters(), url, "adamw", **HP, **kw)
    x, y = _data(dtype)
    for _ in range(STEPS):
        opt.zero_grad()
        _loss(net, x, y).backward()
        opt.step()
    return opt, [p.detach().clone() for p in net.parameters()]


def _rel(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    va = torch.cat([t.detach().double().flatten() for t in a])
    vb = torch.cat([t.detach().double().flatten() for t in b])
    return float((va - vb).norm() / vb.norm())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_model_in_process(dtype) -> None:
    _, want = _torch_recipe(dtype)
    opt, got = _ours(dtype, LOCAL)
    opt.close()
    assert all(p.dtype == dtype for p in got)
    # The models are the masters rounded: where the masters agree to 1e-7, their roundings
    # agree but for values at a rounding boundary.
    same = sum(int((a == b).sum()) for a, b in zip(got, want, strict=True))
    total = sum(a.numel() for a in want)
    assert same >= 0.99 * total, f"{total - same} of {total} values differ"
    assert _rel(got, want) < 1e-2  # and those differ by one unit in the last place


def test_float64_model_is_stepped_in_float32() -> None:
    net64 = _model(torch.float64)
    net32 = _model(torch.float32)
    opt64 = RemoteOptimizer(net64.parameters(), LOCAL, "adamw", **HP)
    opt32 = torch.optim.AdamW(net32.parameters(), **HP)
    x, y = _data(torch.float64)
    for _ in range(STEPS):
        for net, opt in ((net64, opt64), (net32, opt32)):
            opt.zero_grad()
            _loss(net, x.to(net[0].weight.dtype), y.to(net[0].weight.dtype)).backward()
            opt.step()
    opt64.close()
    assert next(net64.parameters()).dtype == torch.float64
    assert _rel(list(net64.parameters()), list(net32.parameters())) < 1e-5


@pytest.mark.e2e
def test_bf16_over_http_and_shm_master_weights_equal_torch(shm_server) -> None:
    masters, want = _torch_recipe(torch.bfloat16)
    for kind, url in (("http", shm_server.url), ("shm", shm_server.shm_url)):
        opt, got = _ours(torch.bfloat16, url, run=f"bf16-{kind}", fresh=True)
        names = [n for n, _ in _model(torch.bfloat16).named_parameters()]
        served = []
        with httpx.Client(base_url=shm_server.url) as c:
            for name in names:
                r = c.get(f"/v1/runs/{opt.remote.run}/params/{name}/value")
                served.append(torch.from_numpy(np.frombuffer(r.content, np.float32).copy()))
        opt.close()
        assert _rel(served, [m.flatten() for m in masters]) <= 1e-6, url
        same = sum(int((a == b).sum()) for a, b in zip(got, want, strict=True))
        assert same >= 0.99 * sum(a.numel() for a in want), url
