"""The CUDA multi-tensor launch prepares its layouts once: the work table (by the tensors'
sizes) and the pointer table (by the very buffers) are uploaded when new and reused when the
same tensors are stepped again; each kernel is looked up once, not per launch. Checked on the
CuPy stand-in (tests/support/fakecupy), which records every host-to-device copy: host/device
handling only, NOT a GPU run."""

from __future__ import annotations

import numpy as np
from stepd.kernels import create_optimizer, get_backend


def _uploads(cupy) -> int:
    return sum(1 for what, _ in cupy.EVENTS if what == "h2d")


def test_a_batch_stepped_again_reuses_its_tables(fake_cupy, monkeypatch) -> None:
    looked_up: list[str] = []
    get_function = fake_cupy.RawModule.get_function
    monkeypatch.setattr(
        fake_cupy.RawModule,
        "get_function",
        lambda self, name: looked_up.append(name) or get_function(self, name),
    )
    get_backend.cache_clear()  # a backend whose kernel lookups are counted
    rng = np.random.default_rng(7)
    shapes = [(300,), (40, 50), (0,), (70_000,)]  # an empty one, one over several chunks
    host = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    grads = [[rng.standard_normal(s).astype(np.float32) for s in shapes] for _ in range(4)]
    results = {}
    for backend in ("cuda", "reference"):
        opt = create_optimizer("adamw", backend=backend, lr=1e-2)
        xp = opt.backend.xp
        params = [xp.asarray(h) for h in host]
        fixed = [xp.asarray(g) for g in grads[0]]  # one set of gradient buffers, reused
        uploads = []
        for step_grads in grads:
            if backend == "cuda":
                for buf, g in zip(fixed, step_grads, strict=True):
                    buf[...] = xp.asarray(g)  # new values in the same buffers
                fake_cupy.EVENTS.clear()
            items = [
                (f"p{i}", s, p, fixed[i] if backend == "cuda" else xp.asarray(step_grads[i]))
                for i, (s, p) in enumerate(zip(shapes, params, strict=True))
            ]
            opt.step_batch(items)
            opt.end_iteration()
            if backend == "cuda":
                uploads.append(_uploads(fake_cupy))
        if backend == "cuda":
            # the first step uploads work, pointer and scalar tables; later ones only scalars
            assert uploads == [3, 1, 1, 1], uploads
            results[backend] = [p.get() for p in params]
        else:
            results[backend] = params
    for got, want in zip(results["cuda"], results["reference"], strict=True):
        assert got.tobytes() == want.tobytes()
    assert sorted(looked_up) == sorted(set(looked_up))  # each kernel looked up once


def test_new_gradient_buffers_reupload_only_the_pointer_table(fake_cupy) -> None:
    opt = create_optimizer("sgd", backend="cuda", lr=0.1)
    cp = fake_cupy
    params = [cp.asarray(np.ones(n, np.float32)) for n in (10, 20)]
    kept = []  # every step's gradients stay alive: new buffers at new addresses each step
    for k in range(3):
        grads = [cp.asarray(np.full(p.size, float(k), np.float32)) for p in params]
        kept.append(grads)
        fake_cupy.EVENTS.clear()
        opt.step_batch([(f"p{i}", (p.size,), p, grads[i]) for i, p in enumerate(params)])
        # work table on the first step only; pointer and scalar tables every step
        assert _uploads(fake_cupy) == (3 if k == 0 else 2), k
