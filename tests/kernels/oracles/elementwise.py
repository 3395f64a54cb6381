"""SGD, Adam, AdamW, NAdamW, RAdam against torch.optim; QHAdamW and Lion against
pytorch-optimizer."""

from __future__ import annotations

import pytorch_optimizer as po
import torch

from . import ParityCase

# torch's NAdam multiplies the momentum by 1 - 0.5 * 0.96 ** (t * momentum_decay); a huge
# momentum_decay turns that factor into exactly 1, i.e. our default (no schedule).
NO_SCHEDULE = 1e9

CASES = [
    ParityCase("sgd-plain", "sgd", {"lr": 0.05}, lambda p: torch.optim.SGD(p, lr=0.05)),
    ParityCase(
        "sgd-momentum-wd",
        "sgd",
        {"lr": 0.02, "momentum": 0.9, "dampening": 0.1, "weight_decay": 0.01},
        lambda p: torch.optim.SGD(p, lr=0.02, momentum=0.9, dampening=0.1, weight_decay=0.01),
    ),
    ParityCase(
        "sgd-nesterov",
        "sgd",
        {"lr": 0.01, "momentum": 0.8, "nesterov": True, "weight_decay": 1e-3},
        lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.8, nesterov=True, weight_decay=1e-3),
    ),
    ParityCase("adam", "adam", {"lr": 1e-3}, lambda p: torch.optim.Adam(p, lr=1e-3)),
    ParityCase(
        "adam-l2",
        "adam",
        {"lr": 3e-3, "betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.1},
        lambda p: torch.optim.Adam(p, lr=3e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1),
    ),
    ParityCase(
        "adamw",
        "adamw",
        {"lr": 1e-3, "weight_decay": 0.05},
        lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.05),
    ),
    ParityCase(
        "adamw-lr-schedule-and-scales",
        "adamw",
        {"lr": 2e-3, "betas": (0.9, 0.95), "weight_decay": 0.1},
        # lr_scale(name) multiplies the lr inside the step: torch sees it as a per-group lr.
        lambda p: torch.optim.AdamW(
            [{"params": p[:2], "lr": 2e-3 * 0.5}, {"params": p[2:]}],
            lr=2e-3,
            betas=(0.9, 0.95),
            weight_decay=0.1,
        ),
        shapes=((7,), (4, 4), (9,), (2, 3)),
        lr_scales={0: 0.5, 1: 0.5},
        lr_at=lambda i: 2e-3 * (1.0 - i / 100),
    ),
    ParityCase(
        "nadamw",
        "nadamw",
        {"lr": 2e-3, "weight_decay": 0.02},
        lambda p: torch.optim.NAdam(
            p, lr=2e-3, weight_decay=0.02, decoupled_weight_decay=True, momentum_decay=NO_SCHEDULE
        ),
    ),
    ParityCase(
        "nadamw-momentum-schedule",
        "nadamw",
        {"lr": 2e-3, "weight_decay": 0.02, "momentum_decay": 4e-3},
        lambda p: torch.optim.NAdam(
            p, lr=2e-3, weight_decay=0.02, decoupled_weight_decay=True, momentum_decay=4e-3
        ),
    ),
    ParityCase(
        # 60 steps: the unrectified branch (t <= 5) and the rectified one (t >= 6).
        "radam",
        "radam",
        {"lr": 1e-3, "weight_decay": 0.01},
        lambda p: torch.optim.RAdam(p, lr=1e-3, weight_decay=0.01),
        steps=60,
    ),
    ParityCase(
        "radam-decoupled",
        "radam",
        {"lr": 1e-3, "betas": (0.9, 0.99), "weight_decay": 0.1, "decoupled_weight_decay": True},
        lambda p: torch.optim.RAdam(
            p, lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1, decoupled_weight_decay=True
        ),
    ),
    ParityCase(
        "qhadamw",
        "qhadamw",
        {"lr": 1e-3, "betas": (0.995, 0.999), "nus": (0.7, 1.0), "weight_decay": 0.01},
        lambda p: po.QHAdam(
            p,
            lr=1e-3,
            betas=(0.995, 0.999),
            nus=(0.7, 1.0),
            weight_decay=0.01,
            weight_decouple=True,
        ),
    ),
    ParityCase(
        "qhadamw-both-nus",
        "qhadamw",
        {"lr": 1e-3, "betas": (0.9, 0.99), "nus": (0.8, 0.6)},
        lambda p: po.QHAdam(p, lr=1e-3, betas=(0.9, 0.99), nus=(0.8, 0.6)),
    ),
    ParityCase(
        "lion",
        "lion",
        {"lr": 1e-4, "betas": (0.9, 0.99), "weight_decay": 0.1},
        lambda p: po.Lion(p, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.1),
    ),
    # amsgrad: the running max of v in the denominator (a third slot).
    ParityCase(
        "adam-amsgrad",
        "adam",
        {"lr": 3e-3, "betas": (0.8, 0.99), "weight_decay": 0.01, "amsgrad": True},
        lambda p: torch.optim.Adam(p, lr=3e-3, betas=(0.8, 0.99), weight_decay=0.01, amsgrad=True),
    ),
    ParityCase(
        "adamw-amsgrad",
        "adamw",
        {"lr": 1e-3, "weight_decay": 0.05, "amsgrad": True},
        lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.05, amsgrad=True),
    ),
    # maximize: every algorithm ascends by negating the gradient first, weight decay included.
    ParityCase(
        "sgd-momentum-maximize",
        "sgd",
        {"lr": 0.02, "momentum": 0.9, "weight_decay": 0.01, "maximize": True},
        lambda p: torch.optim.SGD(p, lr=0.02, momentum=0.9, weight_decay=0.01, maximize=True),
    ),
    ParityCase(
        "adam-l2-maximize",
        "adam",
        {"lr": 3e-3, "weight_decay": 0.1, "maximize": True},
        lambda p: torch.optim.Adam(p, lr=3e-3, weight_decay=0.1, maximize=True),
    ),
    ParityCase(
        "adamw-amsgrad-maximize",
        "adamw",
        {"lr": 1e-3, "weight_decay": 0.05, "amsgrad": True, "maximize": True},
        lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.05, amsgrad=True, maximize=True),
    ),
    ParityCase(
        "nadamw-maximize",
        "nadamw",
        {"lr": 2e-3, "weight_decay": 0.02, "momentum_decay": 4e-3, "maximize": True},
        lambda p: torch.optim.NAdam(
            p,
            lr=2e-3,
            weight_decay=0.02,
            decoupled_weight_decay=True,
            momentum_decay=4e-3,
            maximize=True,
        ),
    ),
    ParityCase(
        "radam-maximize",
        "radam",
        {"lr": 1e-3, "weight_decay": 0.01, "maximize": True},
        lambda p: torch.optim.RAdam(p, lr=1e-3, weight_decay=0.01, maximize=True),
        steps=60,
    ),
]
