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


def test_a_repeated_step_batch_runs_its_prepared_layout(fake_cupy, monkeypatch) -> None:
    """As on the CPU, kernels.Optimizer keeps a CUDA step_batch's layout by parameter names:
    from the second step no tensor table is built in Python (the launch of a new layout is
    never called) and nothing but the scalars is uploaded, while per-tensor lr scales,
    per-parameter step counts, maximize and an lr change still land exactly."""
    from stepd.kernels.backends import cuda

    built = []
    launch_multi = cuda.CudaBackend._launch_multi
    monkeypatch.setattr(
        cuda.CudaBackend,
        "_launch_multi",
        lambda self, op, items: built.append(len(items)) or launch_multi(self, op, items),
    )
    rng = np.random.default_rng(11)
    shapes = [(64,), (3, 70), (0,), (20_000,), (1,)]
    host = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    steps = [[rng.standard_normal(s).astype(np.float32) for s in shapes] for _ in range(6)]
    hp = {"lr": 3e-3, "weight_decay": 0.1, "maximize": True, "step_count": "per_param"}
    results = {}
    for backend in ("cuda", "reference"):
        opt = create_optimizer("adamw", backend=backend, **hp)
        opt.set_lr_scale("p1", 0.5)
        xp = opt.backend.xp
        params = [xp.asarray(h) for h in host]
        uploads = []
        for k, step_grads in enumerate(steps):
            if k == 3:
                opt.set_lr(1e-3)  # a schedule: new scalars, same layout
            names = range(len(shapes)) if k != 1 else range(len(shapes) - 1)  # p4 skips one
            grads = {i: xp.asarray(step_grads[i]) for i in names}
            fake_cupy.EVENTS.clear()
            opt.step_batch([(f"p{i}", shapes[i], params[i], grads[i]) for i in names])
            uploads.append(_uploads(fake_cupy))
            opt.end_iteration()
        results[backend] = [p.get() if backend == "cuda" else p for p in params]
        if backend == "cuda":
            # A layout is prepared after a step of it that had no fresh parameter: the
            # launch of a new layout runs at step 0 (fresh), step 1 (without p4) and step 2
            # (all five again, first time not fresh); from step 3 the prepared one runs. Each
            # step's gradients are made while the step before's are alive, so the buffers
            # alternate between two sets of addresses: step 3 uploads its tensor table, and
            # from then on both tables are kept and only the scalars go up.
            assert built == [len(shapes), len(shapes) - 1, len(shapes)], built
            assert uploads[3:] == [2, 1, 1], uploads
    for got, want in zip(results["cuda"], results["reference"], strict=True):
        assert got.tobytes() == want.tobytes()
