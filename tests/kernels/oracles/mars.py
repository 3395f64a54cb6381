"""MARS-AdamW against ``pytorch_optimizer.MARS`` (``mars_type="adamw"``).

The oracle takes ``||c||`` in float32 (torch), we in float64; ``c`` is clipped on nearly
every step here (standard-normal gradients give ``||c|| > 1`` except on some steps of the
one-element tensors), so both branches of the clip run. The largest absolute difference seen
over the table's 50 steps was 1.2e-7 (bound: rtol 1e-5, atol 1e-6).
"""

from __future__ import annotations

import pytorch_optimizer as po

from . import ParityCase

CASES = [
    ParityCase(
        "mars-optimize-1d",
        "mars",
        {"lr": 3e-3, "optimize_1d": True},
        lambda p: po.MARS(p, lr=3e-3, optimize_1d=True),
    ),
    ParityCase(
        "mars-wd-gamma",
        "mars",
        {
            "lr": 1e-3,
            "betas": (0.9, 0.999),
            "gamma": 0.05,
            "eps": 1e-6,
            "weight_decay": 0.1,
            "optimize_1d": True,
        },
        lambda p: po.MARS(
            p,
            lr=1e-3,
            betas=(0.9, 0.999),
            gamma=0.05,
            eps=1e-6,
            weight_decay=0.1,
            optimize_1d=True,
        ),
    ),
    ParityCase(
        # Defaults: 0-d and 1-D tensors take AdamW with lr_1d / betas_1d / weight_decay_1d,
        # lr_1d following the lr schedule and lr_scale (pytorch-optimizer's lr_1d_factor).
        "mars-adamw-1d-lr-schedule-and-scales",
        "mars",
        {"lr": 2e-3, "weight_decay": 0.05, "lr_1d": 1e-3},
        lambda p: po.MARS(
            [{"params": [p[0], p[1]], "lr": 2e-3 * 0.5}, {"params": p[2:]}],
            lr=2e-3,
            weight_decay=0.05,
            lr_1d=1e-3,
        ),
        shapes=((7,), (4, 4), (), (2, 3), (5,)),
        lr_scales={0: 0.5, 1: 0.5},
        lr_at=lambda i: 2e-3 * (1.0 - i / 100),
    ),
]
