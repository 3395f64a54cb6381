"""A CUDA store on the CuPy stand-in (tests/support/fakecupy) against a CPU store: requests
deliver host arrays, the store keeps device arrays, and the results match bit for bit.
Host/device handling only: NOT a GPU run (bench/gpu_check.py does that on a device)."""

from __future__ import annotations

import numpy as np
import pytest
from stepd.service.errors import Invalid
from stepd.service.store import ParamStore

from stepd.wire import narrow


@pytest.mark.parametrize("algorithm", ["adamw", "sophia", "adafactor", "soap"])
def test_cuda_store_matches_cpu_store(fake_cupy, algorithm) -> None:
    rng = np.random.default_rng(9)
    stores = [ParamStore("cpu"), ParamStore("cuda")]
    value = rng.standard_normal((4, 3)).astype(np.float32)
    for s in stores:
        assert s.register("w", (4, 3), value, algorithm, {"lr": 1e-2})[1]
        assert s.register("b", (3,), None, algorithm, {"lr": 1e-2})[1]
    for step in range(4):
        grads = {
            "w": rng.standard_normal((4, 3)).astype(np.float32),
            "b": narrow(np, rng.standard_normal(3).astype(np.float32), np.dtype(np.uint16)),
        }
        outs = [s.step(grads, read_back=True) for s in stores]
        for a, b in zip(*outs, strict=True):
            assert a.param.tobytes() == b.param.tobytes(), (algorithm, step, a.name)
        if algorithm == "sophia":
            hess = np.abs(rng.standard_normal((4, 3))).astype(np.float32)
            for s in stores:
                s.update_hessian("w", hess)
        for s in stores:
            s.end_iteration()
    bad = {"w": np.full((4, 3), np.nan, np.float32)}
    for s in stores:
        with pytest.raises(Invalid, match="non-finite"):
            s.step(bad)
        with pytest.raises(Invalid, match="non-finite"):
            s.set_value("w", bad["w"])
        s.set_value("w", value)
    cpu, gpu = (s.inspect("w") for s in stores)
    assert cpu[0].tobytes() == gpu[0].tobytes()
    for slot, buf in cpu[1].items():
        assert buf.tobytes() == gpu[1][slot].tobytes(), slot


def test_a_hessian_upload_is_synchronised_before_the_call_returns(fake_cupy, monkeypatch) -> None:
    """From page-locked memory (an shm segment) CuPy copies asynchronously: the store waits for
    the stream before returning, so the client may then overwrite that memory."""
    store = ParamStore("cuda")
    store.register("w", (4,), None, "sophia", {"lr": 1e-2})
    stream = fake_cupy.cuda.get_current_stream()
    calls: list[str] = []
    monkeypatch.setattr(type(stream), "synchronize", lambda self: calls.append("sync"))
    store.update_hessian("w", np.ones(4, np.float32))
    assert calls, "update_hessian returned without waiting for the stream"
