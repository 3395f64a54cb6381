"""Adafactor against torch.optim.Adafactor (torch's placement of eps1) and against
pytorch-optimizer's AdaFactor (the paper's placement, our defaults).

torch floors with eps1 (``V = R C / max(mean R, eps1)``, ``U = G / max(sqrt V, eps1)``) where
the paper adds eps1 to ``G^2``: ``eps1_floor=True`` with ``eps=(None, ...)`` reproduces torch.
Everything else torch does is the paper (``rho_t = min(lr, 1/sqrt t)``, parameter scaling,
``beta2_t = 1 - t^-0.8``, clipping by RMS), so the torch cases cover those with the floor.

pytorch-optimizer's AdaFactor is the paper's algorithm (eps1 = 1e-30 added to ``G^2``, row and
column means, ``V = R C / mean R``) with three knobs set to match: ``momentum_dtype=float32``
(its default keeps the momentum in bfloat16), ``lr=None`` (with ``relative_step`` it ignores
lr and uses the paper's 1e-2 cap, our ``lr=None``), and ``betas[1]``, a cap on ``beta2_t``
that we do not have: 0.999 binds only from t = 1000^(1/0.8) ~ 5623, far past these runs. Its
weight decay scales by ``alpha_t`` (ours, as torch, by lr), so weight decay is checked
against torch only. Small-gradient runs, where the two eps1 placements really differ, are in
test_adafactor.py (the table draws unit-variance gradients).
"""

from __future__ import annotations

import numpy as np
import pytorch_optimizer as po
import torch

from . import ParityCase

# 0-d and 1-D (full second moment), matrices incl. non-square, 3-D and 4-D (batched over the
# leading dims), and the degenerate factorings n x 1 and 1 x m.
SHAPES = ((), (1,), (37,), (16, 9), (3, 5, 7), (2, 3, 4, 5), (9, 1), (1, 9))
TORCH = {"eps": (None, 1e-3), "eps1_floor": True}


def _dead_row_and_column(g: np.ndarray) -> None:
    """A dead input feature and a dead unit: one all-zero row and one all-zero column of each
    matrix slice (an n x 1 or 1 x m one goes all zero), one zero entry of a vector."""
    if g.ndim >= 2:
        g[..., g.shape[-2] // 2, :] = 0.0
        g[..., g.shape[-1] // 2] = 0.0
    elif g.ndim == 1:
        g[g.shape[0] // 2] = 0.0


def _po(params, **kw):
    return po.AdaFactor(params, momentum_dtype=torch.float32, foreach=False, **kw)


CASES = [
    ParityCase(
        "adafactor-torch",
        "adafactor",
        {"lr": 1e-2, **TORCH},
        lambda p: torch.optim.Adafactor(p, lr=1e-2),
        shapes=SHAPES,
        steps=60,
    ),
    ParityCase(
        # lr = 0.2: rho_t = min(lr, 1/sqrt t) switches branch at t = 25; d = 2 and eps2 = 0.05
        # change the clipping and the parameter-scale floor.
        "adafactor-torch-wd-decay-clip",
        "adafactor",
        {"lr": 0.2, "beta2_decay": -0.5, "eps": (None, 0.05), "d": 2.0, "weight_decay": 0.1}
        | {"eps1_floor": True},
        lambda p: torch.optim.Adafactor(
            p, lr=0.2, beta2_decay=-0.5, eps=(None, 0.05), d=2.0, weight_decay=0.1
        ),
        shapes=SHAPES,
    ),
    ParityCase(
        # eps1 = 2 against unit gradients: both floors (mean R and sqrt V) are active.
        "adafactor-torch-eps1-floor-active",
        "adafactor",
        {"lr": 1e-2, "eps": (2.0, 1e-3), "eps1_floor": True},
        lambda p: torch.optim.Adafactor(p, lr=1e-2, eps=(2.0, 1e-3)),
        shapes=SHAPES,
    ),
    ParityCase(
        # lr_scale and set_lr are torch's per-group lr: the cap of rho_t and the decay's lr.
        "adafactor-torch-lr-schedule-and-scales",
        "adafactor",
        {"lr": 0.3, "weight_decay": 0.05, **TORCH},
        lambda p: torch.optim.Adafactor(
            [{"params": p[:2], "lr": 0.3 * 0.5}, {"params": p[2:]}], lr=0.3, weight_decay=0.05
        ),
        shapes=((6, 4), (5,), (4, 6), (2, 3, 3)),
        lr_scales={0: 0.5, 1: 0.5},
        lr_at=lambda i: 0.3 * (1.0 - i / 100),
    ),
    ParityCase(
        "adafactor-paper-defaults",
        "adafactor",
        {},
        lambda p: _po(p, lr=None, betas=(None, 0.999)),
        shapes=SHAPES,
        steps=60,
    ),
    ParityCase(
        # The defaults' eps1 = 1e-30: a dead row's R times a dead column's C (~1e-60) is 0 in
        # float32, so sqrt(V) must never be formed from V itself (it gave 0/0 on step 1).
        "adafactor-paper-dead-row-and-column",
        "adafactor",
        {},
        lambda p: _po(p, lr=None, betas=(None, 0.999)),
        shapes=SHAPES,
        grad_hook=_dead_row_and_column,
    ),
    ParityCase(
        "adafactor-torch-dead-row-and-column",
        "adafactor",
        {"lr": 1e-2, **TORCH},
        lambda p: torch.optim.Adafactor(p, lr=1e-2),
        shapes=SHAPES,
        grad_hook=_dead_row_and_column,
    ),
    ParityCase(
        "adafactor-paper-momentum",
        "adafactor",
        {"lr": None, "beta1": 0.9},
        lambda p: _po(p, lr=None, betas=(0.9, 0.999)),
        shapes=SHAPES,
    ),
    ParityCase(
        # eps1 = 0.1 makes the paper's G^2 + eps1 visible; no parameter scaling.
        "adafactor-paper-eps1-unscaled",
        "adafactor",
        {"lr": None, "eps": (0.1, 1e-3), "beta2_decay": -0.6, "scale_parameter": False},
        lambda p: _po(
            p, lr=None, betas=(None, 0.999), eps1=0.1, decay_rate=-0.6, scale_parameter=False
        ),
        shapes=SHAPES,
    ),
    ParityCase(
        # An absolute step (no relative step) with parameter scaling, momentum, d = 1.5, and a
        # per-tensor lr_scale (pytorch-optimizer's per-group lr).
        "adafactor-absolute-step-momentum",
        "adafactor",
        {"lr": 0.02, "relative_step": False, "beta1": 0.8, "d": 1.5},
        lambda p: _po(
            [{"params": [p[1]], "lr": 0.02 * 0.25}, {"params": [p[0], *p[2:]]}],
            lr=0.02,
            relative_step=False,
            betas=(0.8, 0.999),
            clip_threshold=1.5,
        ),
        shapes=SHAPES,
        lr_scales={1: 0.25},
    ),
]
