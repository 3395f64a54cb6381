"""8-bit state over every transport: ``state_dict`` returns the codes as uint8 and the
scales as float32, and ``load_state_dict`` of it continues bit-identically."""

from __future__ import annotations

import numpy as np
import pytest
from stepd.client import connect

SHAPE = (24, 25)  # 600 elements: blocks of 256, the last one partial
HP = {"lr": 1e-2, "weight_decay": 0.1}


def _train(opt, p: np.ndarray, grads: list[np.ndarray]) -> None:
    for g in grads:
        opt.step("w", SHAPE, p, g)
        opt.end_iteration()


@pytest.mark.parametrize("kind", ["local", "http", "shm"])
def test_state_dict_keeps_codes_and_resumes(shm_server, kind) -> None:
    url = {"local": "local://?backend=cpu", "http": shm_server.url, "shm": shm_server.shm_url}
    rng = np.random.default_rng(5)
    grads = [rng.standard_normal(SHAPE).astype(np.float32) for _ in range(6)]
    p = rng.standard_normal(SHAPE).astype(np.float32)
    with connect(url[kind], "adamw8bit", **HP) as opt:
        _train(opt, p, grads[:3])
        sd = opt.state_dict()
        slots = sd["state"]["w"]["slots"]
        assert {k: (v.dtype.name, v.shape) for k, v in slots.items()} == {
            "exp_avg": ("uint8", SHAPE),
            "exp_avg_sq": ("uint8", SHAPE),
            "exp_avg_absmax": ("float32", (3,)),
            "exp_avg_sq_absmax": ("float32", (3,)),
        }
        resumed_from = p.copy()
        _train(opt, p, grads[3:])
    for where in ("local://?backend=cpu", url[kind]):  # in process, and a fresh remote run
        with connect(where, "adamw8bit", **HP) as resumed:
            resumed.load_state_dict(sd)
            q = resumed_from.copy()
            _train(resumed, q, grads[3:])
        np.testing.assert_array_equal(q, p, err_msg=where)


def test_torch_adapter_state_dict_keeps_codes() -> None:
    torch = pytest.importorskip("torch")
    from stepd.client.torch import RemoteOptimizer

    torch.manual_seed(0)
    models = [torch.nn.Linear(30, 20) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [
        RemoteOptimizer(m.parameters(), "local://?backend=cpu", algorithm="adamw8bit", lr=1e-2)
        for m in models
    ]
    for _ in range(3):
        models[0](torch.randn(8, 30)).sum().backward()
        opts[0].step()
        opts[0].zero_grad()
    sd = opts[0].state_dict()
    weight = sd["state"][0]
    assert (weight["exp_avg"].dtype, weight["exp_avg"].shape) == (torch.uint8, (20, 30))
    assert (weight["exp_avg_absmax"].dtype, weight["exp_avg_absmax"].shape) == (torch.float32, (3,))
    models[1].load_state_dict(models[0].state_dict())
    opts[1].load_state_dict(sd)
    x = torch.randn(8, 30)
    for m, opt in zip(models, opts, strict=True):
        m(x).sum().backward()
        opt.step()
    assert torch.equal(models[0].weight, models[1].weight)
