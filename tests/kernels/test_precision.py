"""Gradients in the model's precision (bfloat16, float16) read by the kernels directly.

Widening is exact, so a low-precision step must equal, bit for bit, the float32 step of the
widened gradient — on the fused CPU kernels and the reference alike; and the rounding back to
the model's dtype must be torch's (round to nearest even).
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from stepd.kernels import create_optimizer
from stepd.kernels.algorithms import ALGORITHMS, ElementwiseAlgorithm
from stepd.kernels.backends import get_backend
from stepd.kernels.precision import BF16, F16, F32, narrow, widen

from .test_fused import CONFIGS, SIZES


def _torch_bits(x: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    t = torch.from_numpy(x).to(dtype)
    return t.view(torch.int16).numpy().view(np.uint16)


def _to(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    return narrow(np, x, dtype)


@pytest.mark.parametrize("where", ["wire", "cpu kernels"])
def test_rounding_is_torchs_round_to_nearest_even(where) -> None:
    """stepd.wire's NumPy rounding (clients, any store) and the CPU kernels' threaded one (a
    server's replies in a model's precision), both against torch's ``.to()``."""
    to = functools.partial(narrow, np) if where == "wire" else get_backend("cpu").narrow
    rng = np.random.default_rng(0)
    x = rng.standard_normal(200_000).astype(np.float32)
    x *= np.float32(10.0) ** rng.integers(-40, 38, x.size).astype(np.float32)
    halfway = (np.arange(1 << 18, dtype=np.uint32) | np.uint32(0x3F800000)).view(np.float32)
    tiny = (np.arange(1 << 16, dtype=np.uint32)).view(np.float32)  # float32 subnormals
    for values in (x[np.isfinite(x)], halfway, tiny, -halfway, -tiny):
        np.testing.assert_array_equal(to(values, BF16), _torch_bits(values, torch.bfloat16))
        np.testing.assert_array_equal(
            to(values, F16).view(np.uint16), _torch_bits(values, torch.float16)
        )


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # Inf - Inf in NumPy
@pytest.mark.parametrize("dtype", [BF16, F16], ids=["bf16", "f16"])
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_every_16_bit_pattern_widens_exactly_in_the_kernel(dtype, backend) -> None:
    """SGD with lr 1 from 0 writes -g: every finite and infinite 16-bit value, through the
    compiled conversion, equals torch's widening."""
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    grad = bits if dtype == BF16 else bits.view(np.float16)
    torch_dtype = torch.bfloat16 if dtype == BF16 else torch.float16
    want = torch.from_numpy(bits.view(np.int16)).view(torch_dtype).float().numpy()
    finite_or_inf = ~np.isnan(want)
    opt = create_optimizer("sgd", backend=backend, lr=1.0)
    p = np.zeros(bits.size, np.float32)
    opt.step("p", p.shape, p, grad)
    np.testing.assert_array_equal((-p)[finite_or_inf], want[finite_or_inf])
    np.testing.assert_array_equal(widen(np, grad)[finite_or_inf], want[finite_or_inf])


def _run(algorithm: str, hp: dict, backend: str, dtype, steps: int = 8) -> tuple[dict, dict]:
    """Steps in ``dtype`` gradients, and the same run on the widened float32 gradients."""
    rng = np.random.default_rng(11)
    shapes = [(n,) for n in SIZES] if algorithm not in ("soap", "kron", "muon") else [(6, 5), (7,)]
    low = create_optimizer(algorithm, backend=backend, **hp)
    wide = create_optimizer(algorithm, backend=backend, **hp)
    p_low = {f"p{i}": rng.standard_normal(s).astype(np.float32) for i, s in enumerate(shapes)}
    p_wide = {k: v.copy() for k, v in p_low.items()}
    for _ in range(steps):
        grads = {
            k: _to((rng.standard_normal(p.shape) * 3).astype(np.float32), dtype)
            for k, p in p_low.items()
        }
        low.step_batch([(k, p.shape, p, grads[k]) for k, p in p_low.items()])
        wide.step_batch([(k, p.shape, p, widen(np, grads[k])) for k, p in p_wide.items()])
        low.end_iteration()
        wide.end_iteration()
    return p_low, p_wide


@pytest.mark.parametrize("dtype", [BF16, F16], ids=["bf16", "f16"])
@pytest.mark.parametrize(("algorithm", "hp"), CONFIGS, ids=[f"{a}-{h}" for a, h in CONFIGS])
def test_fused_low_precision_equals_widened_float32(algorithm, hp, dtype) -> None:
    for backend in ("cpu", "reference"):
        low, wide = _run(algorithm, hp, backend, dtype)
        for name in low:
            np.testing.assert_array_equal(low[name], wide[name], err_msg=f"{backend} {name}")


@pytest.mark.parametrize(
    "algorithm",
    sorted(n for n, c in ALGORITHMS.items() if not issubclass(c, ElementwiseAlgorithm)),
)
def test_other_algorithms_take_low_precision_gradients(algorithm: str) -> None:
    low, wide = _run(algorithm, {}, "cpu", BF16, steps=4)
    for name in low:
        np.testing.assert_array_equal(low[name], wide[name], err_msg=name)


def test_one_batch_of_mixed_gradient_dtypes() -> None:
    rng = np.random.default_rng(3)
    params = [rng.standard_normal(n).astype(np.float32) for n in (17, 40_003, 5)]
    twins = [p.copy() for p in params]
    grads = [
        _to(rng.standard_normal(17).astype(np.float32), BF16),
        rng.standard_normal(40_003).astype(np.float32),
        _to(rng.standard_normal(5).astype(np.float32), F16),
    ]
    mixed = create_optimizer("adamw", backend="cpu", lr=1e-2)
    mixed.step_batch(
        [(f"p{i}", p.shape, p, g) for i, (p, g) in enumerate(zip(params, grads, strict=True))]
    )
    apart = create_optimizer("adamw", backend="reference", lr=1e-2)
    for i, (p, g) in enumerate(zip(twins, grads, strict=True)):
        apart.step(f"p{i}", p.shape, p, widen(np, g))
    for p, q in zip(params, twins, strict=True):
        np.testing.assert_array_equal(p, q)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("n", [1, 17, 40_000, 100_003])
def test_all_finite_screens_16_bit_gradients(backend: str, n: int) -> None:
    be = get_backend(backend)
    for dtype, bad_values in ((BF16, (np.inf, -np.inf, np.nan)), (F16, (np.inf, np.nan, 7e4))):
        g = _to(np.ones(n, np.float32), dtype)
        assert be.all_finite(g)
        for bad in bad_values:  # 7e4 rounds to Inf in float16
            h = g.copy()
            h[n // 2] = _to(np.array([bad], np.float32), dtype)[0]
            assert not be.all_finite(h), (dtype, bad)


def test_other_dtypes_are_refused_by_name() -> None:
    opt = create_optimizer("adamw", backend="cpu")
    p = np.zeros(4, np.float32)
    with pytest.raises(TypeError, match=r"grad must be float32, bfloat16 .* got float64"):
        opt.step("p", (4,), p, np.zeros(4))
    with pytest.raises(TypeError, match="param must be float32, got float16"):
        opt.step("p", (4,), p.astype(np.float16), np.zeros(4, np.float32))
    assert np.float32 == F32


def test_float16_rounding_falls_back_to_numpy_without_the_compilers_float16(monkeypatch) -> None:
    """A library built without _Float16 (GCC < 12) says so with a 0, and NumPy rounds."""
    backend = get_backend("cpu")
    lib = backend._lib

    class WithoutFloat16:
        def __getattr__(self, name):
            return getattr(lib, name)

        @staticmethod
        def stepd_narrow_f16(*args) -> int:
            return 0

    monkeypatch.setattr(backend, "_lib", WithoutFloat16())
    x = np.random.default_rng(5).standard_normal(70_000).astype(np.float32) * 1e3
    got = backend.narrow(x, F16)
    assert got.dtype == F16
    np.testing.assert_array_equal(got.view(np.uint16), narrow(np, x, F16).view(np.uint16))
