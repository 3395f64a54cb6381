"""Kron-PSGD against pytorch-optimizer's ``Kron`` (kron_torch's algorithm), matrices only.

The one random input, the probe ``V`` of each preconditioner update, is injected: the wrapper
swaps pytorch-optimizer's ``update_precondition`` for one that discards its
``torch.randn_like`` draw and passes ours (:func:`stepd.kernels.algorithms.kron.probe_noise` for
the table's names ``p{i}`` and global step ``t``), so both sides see the same ``V``; all the
arithmetic stays pytorch-optimizer's. Its balancing runs with probability ``balance_prob``;
1.0 makes it balance before every update as we do. Its weight decay skips parameters with
fewer than 2 dimensions and its 1-D parameters get a diagonal preconditioner (ours are plain
momentum SGD), hence matrices only here; tests/kernels/test_kron.py covers the rest.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pytorch_optimizer as po
import pytorch_optimizer.optimizer.psgd as po_psgd
import torch
from stepd.kernels.algorithms.kron import probe_noise

from . import ParityCase

# 1 x n: a diagonal left factor on both sides' terms (size 1); the others square or not.
MATRICES = ((6, 5), (12, 3), (1, 7), (3, 9))


class KronOracle:
    """``po.Kron`` stepping with our probes; ``precondition_*`` go into its group defaults."""

    def __init__(self, params: Sequence[Any], seed: int = 0, **kwargs: Any) -> None:
        group_extra = {
            k: kwargs.pop(k) for k in ("precondition_lr", "precondition_init_scale") if k in kwargs
        }
        self.opt = po.Kron(params, balance_prob=1.0, **kwargs)
        for group in self.opt.param_groups:
            group.update(group_extra)
        self.n_params = sum(len(group["params"]) for group in self.opt.param_groups)
        self.seed = seed
        self.t = 0

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.opt.param_groups

    def step(self) -> None:
        self.t += 1
        original = po_psgd.update_precondition
        calls = iter(range(self.n_params))  # once per parameter, in table order

        def with_our_probe(qs, expressions, v, g, step, eps):
            name = f"p{next(calls)}"
            ours = probe_noise(np, self.seed, name, self.t, tuple(v.shape))
            return original(qs, expressions, torch.from_numpy(ours), g, step, eps)

        # One torch thread: on a small machine torch's pool and NumPy's spinning BLAS
        # threads contend, and each tiny torch.triu then waits ~10 ms for a time slice.
        threads = torch.get_num_threads()
        po_psgd.update_precondition = with_our_probe
        torch.set_num_threads(1)
        try:
            self.opt.step()
        finally:
            po_psgd.update_precondition = original
            torch.set_num_threads(threads)


CASES = [
    ParityCase(
        "kron",
        "kron",
        {"lr": 0.01, "momentum": 0.9, "weight_decay": 0.1},
        lambda p: KronOracle(
            p, lr=0.01, momentum=0.9, weight_decay=0.1, pre_conditioner_update_probability=1.0
        ),
        shapes=MATRICES,
        steps=60,
    ),
    ParityCase(
        # max_size_triangular=5: 6, 12, 7 and 9 take diagonal factors, 5, 3 and 1 triangular
        # (or size-1) ones; the raw gradient drives the factor update.
        "kron-diagonal-sides-raw-grad",
        "kron",
        {
            "lr": 0.02,
            "momentum": 0.5,
            "max_size_triangular": 5,
            "momentum_into_precond_update": False,
            "seed": 7,
        },
        lambda p: KronOracle(
            p,
            seed=7,
            lr=0.02,
            momentum=0.5,
            max_size_triangular=5,
            momentum_into_precondition_update=False,
            pre_conditioner_update_probability=1.0,
        ),
        shapes=MATRICES,
        steps=60,
    ),
    ParityCase(
        # Every other step (its counter vs our floor(t p) rule agree for p = 1/k), another
        # precond_lr and init scale, no momentum; an lr schedule and per-tensor lr scales.
        "kron-schedule-lr-scales",
        "kron",
        {
            "lr": 0.01,
            "momentum": 0.0,
            "weight_decay": 0.05,
            "precond_update_prob": 0.5,
            "precond_lr": 0.3,
            "precond_init_scale": 2.0,
        },
        lambda p: KronOracle(
            [{"params": p[:2], "lr": 0.01 * 0.5}, {"params": p[2:]}],
            lr=0.01,
            momentum=0.0,
            weight_decay=0.05,
            pre_conditioner_update_probability=0.5,
            precondition_lr=0.3,
            precondition_init_scale=2.0,
        ),
        shapes=MATRICES,
        steps=60,
        lr_scales={0: 0.5, 1: 0.5},
        lr_at=lambda i: 0.01 * (1.0 - i / 100),
    ),
]
