"""local://?backend=cuda takes host arrays, as every other transport does: the optimizer keeps
float32 master weights on the device and the caller's arrays get copies. Checked on the CuPy
stand-in (tests/support/fakecupy: host/device handling only, NOT a GPU run)."""

from __future__ import annotations

import numpy as np
import pytest
from stepd.client import connect

from stepd.wire import BF16, narrow


@pytest.mark.parametrize("algorithm", ["adamw", "sophia"])
def test_local_cuda_takes_host_arrays_like_the_reference(fake_cupy, algorithm) -> None:
    rng = np.random.default_rng(4)
    init = rng.standard_normal((3, 4)).astype(np.float32)
    grads = [rng.standard_normal((3, 4)).astype(np.float32) for _ in range(5)]
    results = {}
    for backend in ("cuda", "reference"):
        with connect(f"local://?backend={backend}", algorithm, lr=1e-2) as opt:
            w, b = init.copy(), narrow(np, init[0].copy(), BF16)
            for g in grads:
                opt.step_batch([("w", w.shape, w, g), ("b", b.shape, b, narrow(np, g[0], BF16))])
                if algorithm == "sophia":
                    opt.update_hessian("w", w.shape, np.abs(g))
                opt.end_iteration()
            state = opt.state_dict()
            w_before = w.copy()
            opt.load_state_dict(state)  # host arrays in, device state inside
            opt.step("w", w.shape, w, grads[0])
            results[backend] = (w_before, w, b, state)
    (w1, w2, b, s), (rw1, rw2, rb, rs) = results["cuda"], results["reference"]
    np.testing.assert_array_equal(w1, rw1)
    np.testing.assert_array_equal(w2, rw2)
    np.testing.assert_array_equal(b, rb)
    assert b.dtype == BF16
    for slot, arr in s["state"]["w"]["slots"].items():
        assert isinstance(arr, np.ndarray)
        np.testing.assert_array_equal(arr, rs["state"]["w"]["slots"][slot])
