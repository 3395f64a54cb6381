"""The compiled kernels against the NumPy reference, bit for bit.

Both the CPU build and the NumPy reference round every operation once in float32 (the C++ is
compiled with -ffp-contract=off, as the CUDA build with --fmad=false), so agreement is exact;
that is what lets CPU-only CI vouch for the GPU's arithmetic, which is the same header.
"""

from __future__ import annotations

import numpy as np
import pytest
from stepd.kernels import create_optimizer
from stepd.kernels.algorithms import ALGORITHMS, ElementwiseAlgorithm

# Hyperparameters that switch on every branch of every elementwise op.
CONFIGS = [
    ("sgd", {"lr": 0.05}),
    ("sgd", {"lr": 0.05, "momentum": 0.9, "dampening": 0.2, "weight_decay": 0.01}),
    ("sgd", {"lr": 0.05, "momentum": 0.9, "nesterov": True}),
    ("adam", {"lr": 1e-2, "weight_decay": 0.1}),
    ("adamw", {"lr": 1e-2, "weight_decay": 0.1}),
    ("adam", {"lr": 1e-2, "weight_decay": 0.1, "amsgrad": True}),
    ("adamw", {"lr": 1e-2, "weight_decay": 0.1, "amsgrad": True}),
    ("nadamw", {"lr": 1e-2, "weight_decay": 0.1}),
    ("nadamw", {"lr": 1e-2, "momentum_decay": 4e-3}),
    ("radam", {"lr": 1e-2, "weight_decay": 0.1}),
    ("radam", {"lr": 1e-2, "weight_decay": 0.1, "decoupled_weight_decay": True}),
    ("qhadamw", {"lr": 1e-2, "nus": (0.7, 0.9), "weight_decay": 0.1}),
    ("lion", {"lr": 1e-3, "weight_decay": 0.1}),
    # 8-bit state (blockwise kernels): test_cuda.py runs this table on a GPU too
    ("adamw8bit", {"lr": 1e-2, "weight_decay": 0.1}),
    ("lion8bit", {"lr": 1e-3, "weight_decay": 0.1}),
    ("sgd8bit", {"lr": 0.05, "momentum": 0.9, "dampening": 0.2, "weight_decay": 0.01}),
    ("sgd8bit", {"lr": 0.05, "momentum": 0.9, "nesterov": True}),
]
# Sizes around the vector width (16 floats with AVX-512) and the parallel threshold (32768).
SIZES = [1, 15, 16, 17, 1000, 40_003]


def _run(algorithm: str, hparams: dict, backend: str, sizes: list[int], steps: int) -> dict:
    rng = np.random.default_rng(7)
    opt = create_optimizer(algorithm, backend=backend, **hparams)
    params = {f"p{i}": rng.standard_normal(n).astype(np.float32) for i, n in enumerate(sizes)}
    opt.set_lr_scale("p1", 0.25)  # per-tensor scalars inside one launch
    for _ in range(steps):
        grads = {k: (rng.standard_normal(p.size) * 3).astype(np.float32) for k, p in params.items()}
        opt.step_batch([(k, p.shape, p, grads[k]) for k, p in params.items()])
        opt.end_iteration()
    return {"params": params, "state": opt.state_dict()["state"]}


def test_configs_cover_every_elementwise_algorithm() -> None:
    elementwise = {n for n, c in ALGORITHMS.items() if issubclass(c, ElementwiseAlgorithm)}
    assert elementwise <= {a for a, _ in CONFIGS}


@pytest.mark.parametrize(("algorithm", "hparams"), CONFIGS, ids=[f"{a}-{h}" for a, h in CONFIGS])
def test_fused_cpu_equals_reference_bitwise(algorithm: str, hparams: dict) -> None:
    fused = _run(algorithm, hparams, "cpu", SIZES, steps=12)
    ref = _run(algorithm, hparams, "reference", SIZES, steps=12)
    for name, p in fused["params"].items():
        np.testing.assert_array_equal(p, ref["params"][name], err_msg=name)
        for slot, buf in fused["state"][name]["slots"].items():
            np.testing.assert_array_equal(buf, ref["state"][name]["slots"][slot], err_msg=slot)


@pytest.mark.parametrize("algorithm", ["sgd", "adamw", "lion"])
def test_batched_launch_equals_one_call_per_tensor(algorithm: str) -> None:
    hparams = {"momentum": 0.9} if algorithm == "sgd" else {}
    rng = np.random.default_rng(3)
    sizes = [5, 40_000, 3, 70_001]
    a = create_optimizer(algorithm, backend="cpu", **hparams)
    b = create_optimizer(algorithm, backend="cpu", **hparams)
    pa = [rng.standard_normal(n).astype(np.float32) for n in sizes]
    pb = [p.copy() for p in pa]
    for _ in range(5):
        grads = [rng.standard_normal(n).astype(np.float32) for n in sizes]
        a.step_batch(
            [
                (f"w{i}", (n,), p, g)
                for i, (n, p, g) in enumerate(zip(sizes, pa, grads, strict=True))
            ]
        )
        for i, (n, p, g) in enumerate(zip(sizes, pb, grads, strict=True)):
            b.step(f"w{i}", (n,), p, g)
        a.end_iteration()
        b.end_iteration()
    for x, y in zip(pa, pb, strict=True):
        np.testing.assert_array_equal(x, y)


def test_empty_tensor_is_a_no_op() -> None:
    opt = create_optimizer("adamw", backend="cpu")
    p = np.zeros(0, np.float32)
    opt.step("empty", (0,), p, np.zeros(0, np.float32))
    assert opt.state("empty").shape == (0,)


@pytest.mark.parametrize("algorithm", ["adamw", "sgd", "lion"])
def test_the_threads_split_of_the_flat_range_covers_every_tensor_once(algorithm: str) -> None:
    """The CPU kernels split the flat range of all tensors between the threads (SIZES above
    stays on one): tensors on either side of the split, across it, on 64 Ki boundaries and
    empty ones, with a scalar set each, stepped exactly once and exactly as the reference."""
    chunk = 1 << 16
    sizes = [0, chunk + 4_464, 3, chunk, 0, 2 * chunk - 1, chunk - 1, 1, 0, 17, 3 * chunk + 5]
    hparams = {"lr": 1e-3} if algorithm != "sgd" else {"lr": 0.05, "momentum": 0.9}
    fused = _run(algorithm, hparams, "cpu", sizes, steps=3)
    ref = _run(algorithm, hparams, "reference", sizes, steps=3)
    for k in fused["params"]:
        assert fused["params"][k].tobytes() == ref["params"][k].tobytes(), k
