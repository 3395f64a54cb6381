r"""LAMB: Adam with a per-tensor trust ratio (You et al. 2020, 1904.00962), as ``optax.lamb``.

.. math::
    m &\leftarrow \beta_1 m + (1 - \beta_1) g \\
    v &\leftarrow \beta_2 v + (1 - \beta_2) g^2 \\
    u &= \frac{m / (1 - \beta_1^t)}{\sqrt{v / (1 - \beta_2^t)} + \epsilon} + \lambda \theta \\
    r &= \begin{cases} \|\theta\|_2 / \|u\|_2 & \|\theta\|_2 > 0 \text{ and } \|u\|_2 > 0 \\
                       1 & \text{otherwise} \end{cases} \\
    \theta &\leftarrow \theta - \eta\, r\, u

Norms are per tensor (the whole parameter, whatever its shape); ``\theta`` in ``r`` and ``u``
is the parameter before this step. Weight decay enters ``u`` (so it is scaled by the trust
ratio), as in the paper and optax; ``eps`` is outside the root, after bias correction
(optax's ``eps_root`` is 0 here). Slots ``exp_avg`` (m) and ``exp_avg_sq`` (v).

pytorch-optimizer's ``Lamb`` is a different variant (no bias correction, decoupled decay
applied before the norms, ``||theta||`` clamped to 10, ``eps`` added to ``||u||``), so it is
not an oracle for this formulation.

How it runs (two fused passes and a reduction in between):

1. ``lamb_moments`` (fused, every tensor in one launch): update m and v.
2. Per tensor, ``||theta||^2`` and ``||u||^2`` with the array module (NumPy / CuPy), summed in
   float64 so the ratio does not depend on the tensor's size or the summation order beyond
   float64 rounding. ``u`` is not stored: it is recomputed in float32 chunks of
   ``_CHUNK`` elements by :func:`_direction`, the same operations in the same order as the
   kernel's ``lamb_direction`` (so the norm is of the u that pass 3 applies). This bounds
   the temporaries to a few chunk-sized buffers instead of a parameter-sized scratch u, at
   the cost of a second read of p, m, v. On a GPU the sums stay on the device and are
   fetched once for all tensors.
3. ``lamb_apply`` (fused, one launch): ``p += (-lr r) u``, u recomputed from p, m, v.

The fused CPU result is bit-identical to the NumPy reference backend (both take the norms
from the same NumPy code on the same float32 values). On CUDA the per-element arithmetic is
the same header, but CuPy sums the norms in another order, so ``r`` (a float64 ratio
rounded to float32 in ``-lr r``) can differ in its last bit from the CPU's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..ops import Launch, Op
from .adam import AdamCoreHyperparams
from .base import Algorithm, StepItem

_CHUNK = 1 << 20  # elements per chunk of the norm computation (bounds its temporaries)


def _direction(xp: Any, p: Any, m: Any, v: Any, a: Any) -> Any:
    """u in float32, rounding as ``lamb_direction`` in csrc/lamb.cuh (a new array)."""
    denom = v / a.bias_correction2
    xp.sqrt(denom, out=denom)
    denom += a.eps
    u = m / a.bias_correction1
    u /= denom
    xp.multiply(p, a.weight_decay, out=denom)
    u += denom
    return u


def _reference_moments(p: np.ndarray, g: np.ndarray, slots: Sequence[np.ndarray], a) -> None:
    m, v = slots
    m[...] = a.one_minus_beta1 * g + a.beta1 * m
    v[...] = a.one_minus_beta2 * g * g + a.beta2 * v


def _reference_apply(p: np.ndarray, g: np.ndarray, slots: Sequence[np.ndarray], a) -> None:
    m, v = slots
    p += a.neg_step * _direction(np, p, m, v, a)


SLOTS = ("exp_avg", "exp_avg_sq")
LAMB_MOMENTS = Op(
    "lamb_moments",
    SLOTS,
    ("beta1", "one_minus_beta1", "beta2", "one_minus_beta2"),
    _reference_moments,
)
LAMB_APPLY = Op(
    "lamb_apply",
    SLOTS,
    ("bias_correction1", "bias_correction2", "eps", "weight_decay", "neg_step"),
    _reference_apply,
)


@dataclass(frozen=True)
class LambHyperparams(AdamCoreHyperparams):
    """Adam's hyperparameters and checks; optax.lamb's eps default."""

    algorithm = "lamb"
    eps: float = 1e-6


def _sum_sq(xp: Any, x: Any) -> Any:
    """Σ x² of a float32 chunk, accumulated in float64 (a device scalar on CuPy)."""
    x = x.astype(np.float64)
    return xp.dot(x, x)


class Lamb(Algorithm):
    name = "lamb"
    hyperparams = LambHyperparams
    hp: LambHyperparams

    def slot_shapes(self, shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
        return {slot: shape for slot in SLOTS}

    def step(self, backend: Any, items: Sequence[StepItem], t: int) -> None:
        hp, xp = self.hp, backend.xp
        beta1, beta2 = hp.betas
        flat = [
            (it.param.reshape(-1), it.grad.reshape(-1), [it.slots[k].reshape(-1) for k in SLOTS])
            for it in items
        ]
        moments = LAMB_MOMENTS.pack(
            {
                "beta1": beta1,
                "one_minus_beta1": 1.0 - beta1,
                "beta2": beta2,
                "one_minus_beta2": 1.0 - beta2,
            }
        )
        backend.launch(LAMB_MOMENTS, [Launch(p, g, s, moments) for p, g, s in flat])

        scalars = {
            "bias_correction1": 1.0 - beta1**t,
            "bias_correction2": 1.0 - beta2**t,
            "eps": hp.eps,
            "weight_decay": hp.weight_decay,
            "neg_step": 0.0,
        }
        a = LAMB_APPLY.unpack(LAMB_APPLY.pack(scalars))  # float32, as the kernel sees them
        sums = []  # (||p||², ||u||²) per tensor, on the device until one fetch for all
        for p, _, (m, v) in flat:
            p_sq = u_sq = xp.zeros((), dtype=np.float64)
            for lo in range(0, p.size, _CHUNK):
                pc, mc, vc = p[lo : lo + _CHUNK], m[lo : lo + _CHUNK], v[lo : lo + _CHUNK]
                p_sq = p_sq + _sum_sq(xp, pc)
                u_sq = u_sq + _sum_sq(xp, _direction(xp, pc, mc, vc, a))
            sums.append(xp.stack([p_sq, u_sq]))
        to_host = getattr(xp, "asnumpy", np.asarray)
        norms = np.sqrt(to_host(xp.stack(sums))) if sums else np.zeros((0, 2))

        launches = []
        for it, (p, g, s), (p_norm, u_norm) in zip(items, flat, norms.tolist(), strict=True):
            # optax: the ratio is 1 when either norm is 0 (a zero-initialised tensor moves).
            ratio = 1.0 if p_norm == 0.0 or u_norm == 0.0 else p_norm / u_norm
            args = LAMB_APPLY.pack({**scalars, "neg_step": -it.lr * ratio})
            launches.append(Launch(p, g, s, args))
        backend.launch(LAMB_APPLY, launches)
