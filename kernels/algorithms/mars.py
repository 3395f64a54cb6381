r"""MARS-AdamW: AdamW on a variance-reduced gradient (Yuan et al. 2024, 2411.10438), in
``pytorch_optimizer.MARS``'s formulation (``mars_type="adamw"``, the test oracle).

For a parameter that MARS optimises (matrices, or every parameter with ``optimize_1d``):

.. math::
    c &= g + \gamma \frac{\beta_1}{1 - \beta_1} (g - g_{\text{prev}}) \\
    c &\leftarrow c / \|c\|_2 \quad \text{if } \|c\|_2 > 1 \\
    m &\leftarrow m + (1 - \beta_1)(c - m) \\
    v &\leftarrow \beta_2 v + (1 - \beta_2) c^2 \\
    \theta &\leftarrow \theta (1 - \eta \lambda)
        - \eta \frac{\sqrt{1 - \beta_2^t}}{1 - \beta_1^t}
          \frac{m}{\sqrt{v + 10^{-15}} + \epsilon} \\
    g_{\text{prev}} &\leftarrow g

The norm is per tensor (the whole parameter). ``g_prev`` starts at zero, so on a tensor's
first step ``c = (1 + \gamma \beta_1 / (1 - \beta_1)) g`` (before the clip), as in
pytorch-optimizer and the authors' code (timm's port special-cases step 1
instead). This is the "approximate" MARS: ``g_prev`` is the previous step's gradient, at
the previous parameters. ``\epsilon`` is added to ``\sqrt{v}`` before the bias correction
of ``v``, and ``10^{-15}`` sits under the root, both as pytorch-optimizer's denominator
(``apply_ams_bound``); the weight decay is decoupled and scaled by ``\eta`` (its
``weight_decouple=True, fixed_decay=False``). The authors' reference code (AGI-Arena/MARS)
differs only there: it adds ``\epsilon`` after the bias correction,
``(\sqrt{v / (1 - \beta_2^t)} + \epsilon)(1 - \beta_1^t)``, without ``10^{-15}``; the two agree
once ``\sqrt{v}`` is well above ``\epsilon``.

With ``optimize_1d=False`` (the default, as pytorch-optimizer and the authors), 0-d and 1-D
parameters take plain AdamW on ``g`` instead (same update with ``c = g``, no clip), with
``betas_1d``, ``weight_decay_1d`` and the lr ``\eta_{1d} = \eta \cdot \text{lr\_1d} /
\text{lr}``: ``lr_1d`` is the 1-D lr at the configured ``lr``, and ``set_lr`` schedules and
``lr_scale`` multiply both alike (pytorch-optimizer's ``lr_1d_factor``; so it needs
``lr > 0``). Those parameters keep no ``last_grad`` (pytorch-optimizer keeps one it never
reads). Only the AdamW flavour is implemented (not ``lion``/``shampoo``, AMSGrad, cautious).

Slots: ``exp_avg``, ``exp_avg_sq`` and, for MARS-optimised parameters, ``last_grad``.

How it runs (fused passes and a reduction in between, no parameter-sized temporaries):

1. ``mars_correct`` (fused, all MARS tensors in one launch): ``c`` is written into the
   ``last_grad`` slot, whose old value it consumes.
2. ``||c||`` per tensor with the array module, float64 accumulation over float32 chunks of
   ``_CHUNK`` elements; on a GPU the sums are fetched once for all tensors.
3. ``mars_adamw`` (fused, one launch): ``c / clip`` (``clip = ||c||`` if above 1, else 1),
   the moments, the step, and ``last_grad = g``. ``mars_adamw_1d`` (one launch) for the
   1-D AdamW parameters.

Between 1 and 3 ``last_grad`` holds ``c``; nothing in 2 raises on valid input, so the state
is consistent again when ``step`` returns. The fused CPU result is bit-identical to the
NumPy reference backend (the norm is the same NumPy code on the same bits); on CUDA only
the summation order of the float64 norm differs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..hyperparams import Hyperparams, check_betas, check_eps, check_lr, check_weight_decay
from ..ops import Launch, Op
from .base import Algorithm, StepItem

_CHUNK = 1 << 20  # elements per chunk of the norm (bounds its float64 temporary to 8 MiB)
V_EPS = 1e-15  # pytorch-optimizer's exp_avg_sq_eps, under the square root


def _reference_correct(p: np.ndarray, g: np.ndarray, slots: Sequence[np.ndarray], a) -> None:
    (last,) = slots
    last[...] = (g - last) * a.coef + g


def _adamw(p: np.ndarray, c: np.ndarray, m: np.ndarray, v: np.ndarray, a) -> None:
    m += a.one_minus_beta1 * (c - m)
    v[...] = v * a.beta2 + a.one_minus_beta2 * c * c
    denom = (np.sqrt(v + a.v_eps) + a.eps) / a.bias_correction2_sqrt * a.bias_correction1
    p *= a.decay
    p += a.neg_lr * (m / denom)


def _reference_adamw(p: np.ndarray, g: np.ndarray, slots: Sequence[np.ndarray], a) -> None:
    m, v, last = slots
    _adamw(p, last / a.clip, m, v, a)
    last[...] = g


def _reference_adamw_1d(p: np.ndarray, g: np.ndarray, slots: Sequence[np.ndarray], a) -> None:
    m, v = slots
    _adamw(p, g, m, v, a)


_ADAMW_ARGS = (
    "decay",
    "neg_lr",
    "one_minus_beta1",
    "beta2",
    "one_minus_beta2",
    "bias_correction1",
    "bias_correction2_sqrt",
    "eps",
    "v_eps",
    "clip",
)
MARS_SLOTS = ("exp_avg", "exp_avg_sq", "last_grad")
ADAMW_SLOTS = ("exp_avg", "exp_avg_sq")
MARS_CORRECT = Op("mars_correct", ("last_grad",), ("coef",), _reference_correct)
MARS_ADAMW = Op("mars_adamw", MARS_SLOTS, _ADAMW_ARGS, _reference_adamw)
MARS_ADAMW_1D = Op("mars_adamw_1d", ADAMW_SLOTS, _ADAMW_ARGS, _reference_adamw_1d)


def _check_non_negative(name: str, value: float) -> None:
    if not (math.isfinite(value) and value >= 0.0):
        raise ValueError(f"Invalid {name} value: {value}")


@dataclass(frozen=True)
class MarsHyperparams(Hyperparams):
    algorithm = "mars"
    lr: float = 3e-3
    betas: tuple[float, float] = (0.95, 0.99)
    gamma: float = 0.025
    eps: float = 1e-8
    weight_decay: float = 0.0
    # AdamW for 0-d / 1-D parameters unless optimize_1d (defaults: pytorch-optimizer's).
    optimize_1d: bool = False
    lr_1d: float = 3e-3
    betas_1d: tuple[float, float] = (0.9, 0.95)
    weight_decay_1d: float = 0.1

    def validate(self) -> None:
        check_lr(self.lr)
        check_betas(self.betas)
        _check_non_negative("gamma", self.gamma)
        check_eps(self.eps)
        check_weight_decay(self.weight_decay)
        _check_non_negative("lr_1d", self.lr_1d)
        for i, beta in enumerate(self.betas_1d):
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"Invalid betas_1d parameter at index {i}: {beta}")
        _check_non_negative("weight_decay_1d", self.weight_decay_1d)
        if not self.optimize_1d and self.lr == 0.0:
            raise ValueError(
                "lr_1d needs lr > 0 when optimize_1d is False: the 1-D lr is lr_t * lr_1d / lr"
            )


def _sum_sq(xp: Any, flat: Any) -> Any:
    """Σ x² of a float32 vector, accumulated in float64 (a device scalar on CuPy)."""
    total = xp.zeros((), dtype=np.float64)
    for lo in range(0, flat.size, _CHUNK):
        chunk = flat[lo : lo + _CHUNK].astype(np.float64)
        total = total + xp.dot(chunk, chunk)
    return total


class Mars(Algorithm):
    name = "mars"
    hyperparams = MarsHyperparams
    hp: MarsHyperparams

    def uses_mars(self, shape: tuple[int, ...]) -> bool:
        """Whether a parameter of ``shape`` takes MARS (else the 1-D AdamW)."""
        return self.hp.optimize_1d or len(shape) >= 2

    def slot_shapes(self, shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
        return {slot: shape for slot in (MARS_SLOTS if self.uses_mars(shape) else ADAMW_SLOTS)}

    def lr_1d(self, lr: float) -> float:
        """The 1-D AdamW lr for the effective MARS lr ``lr`` (see the docstring)."""
        return lr * (self.hp.lr_1d / self.hp.lr)

    def _adamw_scalars(
        self, t: int, lr: float, betas: tuple[float, float], weight_decay: float, clip: float
    ) -> dict[str, float]:
        beta1, beta2 = betas
        return {
            "decay": 1.0 - lr * weight_decay,
            "neg_lr": -lr,
            "one_minus_beta1": 1.0 - beta1,
            "beta2": beta2,
            "one_minus_beta2": 1.0 - beta2,
            "bias_correction1": 1.0 - beta1**t,
            "bias_correction2_sqrt": math.sqrt(1.0 - beta2**t),
            "eps": self.hp.eps,
            "v_eps": V_EPS,
            "clip": clip,
        }

    def step(self, backend: Any, items: Sequence[StepItem], t: int) -> None:
        mars = [it for it in items if self.uses_mars(it.shape)]
        vectors = [it for it in items if not self.uses_mars(it.shape)]
        if mars:
            self._step_mars(backend, mars, t)
        if vectors:
            self._step_adamw_1d(backend, vectors, t)

    def _step_adamw_1d(self, backend: Any, items: Sequence[StepItem], t: int) -> None:
        hp = self.hp
        launches = []
        for it in items:
            scalars = self._adamw_scalars(
                t, self.lr_1d(it.lr), hp.betas_1d, hp.weight_decay_1d, clip=1.0
            )
            slots = [it.slots[k].reshape(-1) for k in ADAMW_SLOTS]
            args = MARS_ADAMW_1D.pack(scalars)
            launches.append(Launch(it.param.reshape(-1), it.grad.reshape(-1), slots, args))
        backend.launch(MARS_ADAMW_1D, launches)

    def _step_mars(self, backend: Any, items: Sequence[StepItem], t: int) -> None:
        hp, xp = self.hp, backend.xp
        beta1 = hp.betas[0]
        flat = [
            (
                it.param.reshape(-1),
                it.grad.reshape(-1),
                [it.slots[k].reshape(-1) for k in MARS_SLOTS],
            )
            for it in items
        ]
        coef = MARS_CORRECT.pack({"coef": hp.gamma * (beta1 / (1.0 - beta1))})
        backend.launch(MARS_CORRECT, [Launch(p, g, [s[2]], coef) for p, g, s in flat])

        to_host = getattr(xp, "asnumpy", np.asarray)
        norms = np.sqrt(to_host(xp.stack([_sum_sq(xp, s[2]) for _, _, s in flat])))

        launches = []
        for it, (p, g, s), norm in zip(items, flat, norms.tolist(), strict=True):
            clip = norm if norm > 1.0 else 1.0
            args = self._adamw_scalars(t, it.lr, hp.betas, hp.weight_decay, clip)
            launches.append(Launch(p, g, s, MARS_ADAMW.pack(args)))
        backend.launch(MARS_ADAMW, launches)
