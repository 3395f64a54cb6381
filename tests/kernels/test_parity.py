"""Every algorithm against an independent implementation, step by step (see oracles/)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from stepd.kernels import create_optimizer

from .oracles import ParityCase, all_cases

CASES = all_cases()


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_matches_oracle_every_step(case: ParityCase) -> None:
    rng = np.random.default_rng(sum(map(ord, case.id)))
    ours = [rng.standard_normal(s).astype(np.float32) for s in case.shapes]
    theirs = [torch.nn.Parameter(torch.from_numpy(p.copy())) for p in ours]
    oracle = case.oracle(theirs)
    opt = create_optimizer(case.algorithm, backend="cpu", **case.hparams)
    names = [f"p{i}" for i in range(len(ours))]
    for i, scale in case.lr_scales.items():
        opt.set_lr_scale(names[i], scale)

    for step in range(case.steps):
        if case.lr_at is not None and (lr := case.lr_at(step)) is not None:
            opt.set_lr(lr)
            for group in oracle.param_groups:
                first = next(i for i, t in enumerate(theirs) if t is group["params"][0])
                group["lr"] = lr * case.lr_scales.get(first, 1.0)
        grads = [rng.standard_normal(p.shape).astype(np.float32) for p in ours]
        if case.grad_hook is not None:
            for g in grads:
                case.grad_hook(g)
        for t, g in zip(theirs, grads, strict=True):
            t.grad = torch.from_numpy(g.copy())
        oracle.step()
        opt.step_batch(list(zip(names, [p.shape for p in ours], ours, grads, strict=True)))
        opt.end_iteration()
        for name, p, t in zip(names, ours, theirs, strict=True):
            np.testing.assert_allclose(
                p,
                t.detach().numpy(),
                rtol=case.rtol,
                atol=case.atol,
                equal_nan=False,  # NaN on both sides is a shared bug, not parity
                err_msg=f"{case.id}: {name} diverged at step {step + 1}",
            )
