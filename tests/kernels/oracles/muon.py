"""Muon against torch.optim.Muon, its Newton–Schulz run in float32; the AdamW fallback for
0-d / 1-D parameters against torch.optim.AdamW beside it (the usual two-optimizer setup).

torch.optim.Muon orthogonalises in bfloat16 (about 3 significant digits), so it is compared
with its own ``_zeropower_via_newtonschulz`` recompiled from torch's source with the cast
``grad.bfloat16()`` replaced by a float32 copy: torch's code and matmul order, our precision.
Documented differences that remain, both far inside rtol 1e-5 / atol 1e-6 over 60 steps:
torch normalises by ``max(||U||_F, eps)``, we by ``||U||_F + eps`` (Jordan's form): a relative
change of at most ``eps / ||U||_F`` ~ 1e-7 here; and float32 matmuls differ in summation order
between torch and NumPy's BLAS (measured: ~1e-6 absolute in O, times lr in the parameter).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.optim._muon as _muon

from . import ParityCase


def _f32_newton_schulz() -> Any:
    src = inspect.getsource(_muon._zeropower_via_newtonschulz)
    cast = "grad.bfloat16()"
    if src.count(cast) != 1:
        raise RuntimeError("torch.optim._muon changed: cannot switch its Newton–Schulz to f32")
    # A copy: `.float()` of a float32 tensor is the tensor itself, and the function divides in
    # place (it would scale the momentum buffer when Nesterov is off).
    src = src.replace(cast, "grad.to(torch.float32, copy=True)")
    namespace = dict(vars(_muon))
    exec(compile(src, _muon.__file__, "exec"), namespace)
    return namespace["_zeropower_via_newtonschulz"]


_NS_F32 = _f32_newton_schulz()


class F32Muon:
    """torch.optim.Muon whose steps run the float32 Newton–Schulz above."""

    def __init__(self, params: Sequence[torch.Tensor] | list[dict], **kwargs: Any) -> None:
        self.opt = torch.optim.Muon(params, **kwargs)
        self.param_groups = self.opt.param_groups

    def step(self) -> None:
        original = _muon._zeropower_via_newtonschulz
        _muon._zeropower_via_newtonschulz = _NS_F32
        try:
            self.opt.step()
        finally:
            _muon._zeropower_via_newtonschulz = original


class MuonWithAdamW:
    """Muon (float32 NS) for every parameter with >= 2 dims, viewed as (shape[0], rest),
    torch.optim.AdamW for the others: what ``muon`` does in one group config."""

    def __init__(
        self, params: Sequence[torch.nn.Parameter], muon: dict[str, Any], adamw: dict[str, Any]
    ) -> None:
        # 2-D Parameters sharing storage with the >= 3-D originals (torch's Muon wants 2-D).
        self.views = [
            (p, torch.nn.Parameter(p.data.view(p.shape[0], math.prod(p.shape[1:]))))
            for p in params
            if p.ndim >= 2
        ]
        self.muon = F32Muon([v for _, v in self.views], **muon)
        self.adamw = torch.optim.AdamW([p for p in params if p.ndim < 2], **adamw)
        self.param_groups = [*self.muon.param_groups, *self.adamw.param_groups]

    def step(self) -> None:
        for p, v in self.views:
            v.grad = p.grad.reshape(v.shape)
        self.muon.step()
        self.adamw.step()


TALL_WIDE_SQUARE = ((16, 9), (9, 16), (12, 12), (64, 32), (1, 7), (7, 1))

CASES = [
    ParityCase(
        "muon",
        "muon",
        {"lr": 0.02},
        lambda p: F32Muon(p, lr=0.02),
        shapes=TALL_WIDE_SQUARE,
        steps=60,
    ),
    ParityCase(
        "muon-plain-momentum-match-rms",
        "muon",
        {
            "lr": 0.01,
            "momentum": 0.9,
            "nesterov": False,
            "weight_decay": 0.05,
            "adjust_lr_fn": "match_rms_adamw",
        },
        lambda p: F32Muon(
            p,
            lr=0.01,
            momentum=0.9,
            nesterov=False,
            weight_decay=0.05,
            adjust_lr_fn="match_rms_adamw",
        ),
        shapes=TALL_WIDE_SQUARE,
        steps=60,
    ),
    ParityCase(
        "muon-lr-schedule-and-scales",
        "muon",
        {"lr": 0.02, "weight_decay": 0.1, "ns_steps": 7},
        # lr_scale(name) multiplies the lr inside the step (decay and update alike): torch sees
        # it as a per-group lr.
        lambda p: F32Muon(
            [{"params": p[:2], "lr": 0.02 * 0.5}, {"params": p[2:]}],
            lr=0.02,
            weight_decay=0.1,
            ns_steps=7,
        ),
        shapes=((10, 6), (6, 10), (8, 8)),
        lr_scales={0: 0.5, 1: 0.5},
        lr_at=lambda i: 0.02 * (1.0 - i / 100),
        steps=50,
    ),
    ParityCase(
        "muon-with-adamw-fallback",
        "muon",
        {
            "lr": 0.02,
            "weight_decay": 0.1,
            "adamw_lr": 3e-3,
            "adamw_betas": (0.8, 0.95),
            "adamw_eps": 1e-6,
            "adamw_weight_decay": 0.05,
        },
        lambda p: MuonWithAdamW(
            p,
            muon={"lr": 0.02, "weight_decay": 0.1},
            adamw={"lr": 3e-3, "betas": (0.8, 0.95), "eps": 1e-6, "weight_decay": 0.05},
        ),
        shapes=((), (1,), (37,), (16, 9), (3, 5, 7), (4, 3, 2, 2)),
        steps=60,
    ),
]
