"""The norms a CUDA store samples (every ``stats_every`` steps) are reduced on the device:
only scalars come to the host, never a tensor. Checked on the CuPy stand-in
(tests/support/fakecupy), which counts the bytes of every device-to-host copy: host/device
handling only, NOT a GPU run."""

from __future__ import annotations

import math

import numpy as np
from stepd.kernels import global_grad_clip_scale, l2_norm
from stepd.service.store import ParamStore


def test_sampled_norms_copy_only_scalars_to_the_host(fake_cupy) -> None:
    rng = np.random.default_rng(5)
    value = rng.standard_normal(4096).astype(np.float32)
    stores = {d: ParamStore(d, stats_every=4) for d in ("cpu", "cuda")}
    for s in stores.values():
        s.register("w", (64, 64), value, "adamw", {"lr": 1e-2})
    for step in range(8):
        grad = {"w": rng.standard_normal((64, 64)).astype(np.float32)}
        stores["cpu"].step(grad)
        fake_cupy.TO_HOST.clear()
        stores["cuda"].step(grad)
        assert max(fake_cupy.TO_HOST, default=0) <= 8, (step, fake_cupy.TO_HOST)
    cpu, gpu = (s.entry("w") for s in stores.values())
    assert gpu.norms_at_version == cpu.norms_at_version == 5  # sampled at versions 0 and 4
    assert math.isclose(gpu.last_grad_norm, cpu.last_grad_norm, rel_tol=1e-12)
    assert math.isclose(gpu.last_update_norm, cpu.last_update_norm, rel_tol=1e-12)


def test_norms_of_device_arrays_skip_non_finite_entries(fake_cupy) -> None:
    host = [np.array([3.0, np.nan, 4.0], np.float32), np.array([np.inf, 12.0], np.float32)]
    device = [fake_cupy.asarray(h) for h in host]
    fake_cupy.TO_HOST.clear()
    assert l2_norm(device[0]) == l2_norm(host[0]) == 5.0
    assert global_grad_clip_scale(device, 6.5) == global_grad_clip_scale(host, 6.5) == 0.5
    assert max(fake_cupy.TO_HOST) <= 8  # scalars only
