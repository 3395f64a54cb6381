"""The CUDA backend against the NumPy reference, on a GPU (skipped, with the reason, without)."""

from __future__ import annotations

import numpy as np
import pytest
from stepd.kernels import create_optimizer

from .gpu import cuda_or_skip
from .test_fused import CONFIGS, SIZES


@pytest.mark.gpu
@pytest.mark.parametrize(("algorithm", "hparams"), CONFIGS, ids=[f"{a}-{h}" for a, h in CONFIGS])
def test_cuda_equals_reference_bitwise(algorithm: str, hparams: dict) -> None:
    cp = cuda_or_skip()
    rng = np.random.default_rng(11)
    host = [rng.standard_normal(n).astype(np.float32) for n in SIZES]
    dev = [cp.asarray(p) for p in host]
    ref = create_optimizer(algorithm, backend="reference", **hparams)
    gpu = create_optimizer(algorithm, backend="cuda", **hparams)
    for opt in (ref, gpu):
        opt.set_lr_scale("p1", 0.25)
    for step in range(12):
        grads = [(rng.standard_normal(n) * 3).astype(np.float32) for n in SIZES]
        ref.step_batch(
            [(f"p{i}", p.shape, p, g) for i, (p, g) in enumerate(zip(host, grads, strict=True))]
        )
        items = [
            (f"p{i}", p.shape, p, cp.asarray(g))
            for i, (p, g) in enumerate(zip(dev, grads, strict=True))
        ]
        if step % 2:  # both paths: one launch per tensor, and the multi-tensor launch
            gpu.step_batch(items)
        else:
            for item in items:
                gpu.step(*item)
        ref.end_iteration()
        gpu.end_iteration()
    for i, (h, d) in enumerate(zip(host, dev, strict=True)):
        np.testing.assert_array_equal(cp.asnumpy(d), h, err_msg=f"p{i}")
    ref_sd, gpu_sd = ref.state_dict(), gpu.state_dict()
    for name, st in ref_sd["state"].items():
        for slot, buf in st["slots"].items():
            np.testing.assert_array_equal(gpu_sd["state"][name]["slots"][slot], buf)
