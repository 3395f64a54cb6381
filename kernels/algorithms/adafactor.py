r"""Adafactor (Shazeer & Stern 2018, arXiv:1804.04235): a factored second moment, update
clipping by RMS and a relative step size.

At global step ``t`` (1-based), with :math:`\eta` = lr × lr_scale(name) and :math:`c` =
``beta2_decay``:

.. math::
    \hat\beta_{2t} &= 1 - t^{c}
        \quad (0 \text{ on a parameter's first step: its moments start at } G^2) \\
    \rho_t &= \min(\eta, 1/\sqrt{t}) \text{ if relative\_step, else } \eta \\
    \alpha_t &= \rho_t \max(\epsilon_2, \mathrm{RMS}(\theta_{t-1}))
        \text{ if scale\_parameter, else } \rho_t \\
    \theta &\leftarrow \theta (1 - \eta \lambda) \\
    Q &= G^2 + \epsilon_1 \quad (\text{eps1\_floor: } Q = G^2 \text{, see below}) \\
    \text{matrices: } R &\leftarrow \hat\beta_{2t} R + (1 - \hat\beta_{2t})
        \operatorname{mean}_{j} Q_{ij}, \quad
    C \leftarrow \hat\beta_{2t} C + (1 - \hat\beta_{2t}) \operatorname{mean}_{i} Q_{ij}, \quad
    \hat V_{ij} = \frac{R_i C_j}{\operatorname{mean}_i R_i} \\
    \text{vectors: } \hat V &\leftarrow \hat\beta_{2t} \hat V + (1 - \hat\beta_{2t}) Q \\
    U &= G / \sqrt{\hat V}, \qquad \hat U = U / \max(1, \mathrm{RMS}(U) / d) \\
    \theta &\leftarrow \theta - \alpha_t \hat U
        \quad\text{or, with } \beta_1\text{:}\quad
        m \leftarrow \beta_1 m + (1 - \beta_1) \alpha_t \hat U, \;\; \theta \leftarrow \theta - m

"Matrices" are parameters with two or more dimensions: the statistics run over the LAST TWO
dimensions (``i`` over ``shape[-2]`` rows, ``j`` over ``shape[-1]`` columns), leading
dimensions are batched, each slice normalised by its own ``mean_i R_i``. 0-d and 1-D
parameters keep the full second moment (the paper's Algorithm 5).

Slots (float32): ``exp_avg_sq_row`` ``shape[:-1]`` and ``exp_avg_sq_col``
``shape[:-2] + shape[-1:]`` for matrices, ``exp_avg_sq`` (param-shaped) otherwise, plus
``exp_avg`` (param-shaped) when ``beta1`` is set. The momentum averages the scaled, clipped
update, as the authors' tensor2tensor code does (and HF transformers, pytorch-optimizer).

**Mean, not sum.** The paper writes ``R = (G^2) 1_m``, ``C = 1_n^T (G^2)`` and divides by
``1_n^T R``; with row and column *means* and division by ``mean_i R_i`` the m and n factors
cancel and ``V̂`` is the same matrix. The Rust crate rlx-optim keeps the means but divides
by ``sum_i R_i``, which makes ``V̂`` ``n`` times too small and ``U`` ``sqrt(n)`` times too
large; the clipping hides that only where the correct ``U`` is clipped too (RMS(U) >= d).
That is a bug; this module follows the paper and torch.

**Defaults: the paper.** ``lr = 1e-2`` (the paper's cap on the relative step),
``beta2_decay = -0.8``, ``eps = (1e-30, 1e-3)``, ``d = 1``, relative step and parameter
scaling on, no momentum, no weight decay. ``lr=None`` is accepted and means exactly that
relative step, ``min(1e-2, 1/sqrt(t))`` (as in HF transformers); it is stored as ``1e-2``
because the optimizer multiplies lr by lr_scale, schedules it with ``set_lr`` and
checkpoints it as a number. A given ``lr`` caps the relative step (torch's reading; the
paper's value is the default), or is the step itself with ``relative_step=False``.

**torch.optim.Adafactor** runs the paper's update (relative step capped by lr, parameter
scaling, ``1 - t^-0.8``, clipping) except for ``epsilon_1``: it keeps the moments of ``G^2``
alone and floors instead, ``V̂ = R C / max(mean R, eps1)`` and ``U = G / max(sqrt(V̂), eps1)``,
with a default ``eps1 = None``, float32's machine epsilon (1.2e-7), not 1e-30. That floor
changes the update whenever ``mean G^2 < eps1``, i.e. gradients below ~3e-4.
``eps1_floor=True`` selects torch's placement, and ``eps=(None, ...)`` its eps1, so
``create_optimizer("adafactor", lr=lr, beta2_decay=c, eps=(None, 1e-3), d=d,
weight_decay=wd, eps1_floor=True)`` is ``torch.optim.Adafactor(lr=lr, beta2_decay=c,
eps=(None, 1e-3), d=d, weight_decay=wd)``. The weight decay, which the paper does not have,
is torch's: decoupled, ``theta (1 - lr wd)`` with lr, not ``alpha_t`` (pytorch-optimizer
uses ``alpha_t``). torch offers no momentum and no absolute step; we offer no ``maximize``.

**Steps.** ``t`` is the global step (rlx-optim), for ``rho_t`` and ``beta2_t``; torch counts
steps per parameter, the same thing when every parameter is stepped every iteration. A
parameter first stepped at a later ``t`` still starts its moments at its first ``G^2``
(``beta2_t = 0`` on that step, as torch's per-parameter step 1 and the paper's ``t = 1``):
zero moments averaged with ``beta2_t`` near 1 would make ``V̂`` far too small for hundreds
of steps, as there is no bias correction.

**Underflow.** With ``eps1 = 1e-30`` an all-zero gradient row and column (a dead input and
a dead unit) give ``R_i = C_j = 1e-30``: ``V̂_ij ~ 1e-60`` is 0 in float32 and ``U_ij = 0/0``.
So ``sqrt(V̂)`` is computed as ``sqrt(R_i / mean R) sqrt(C_j)`` (~1e-30, HF transformers'
reciprocal roots taken separately), and torch's floor ``max(V̂, eps1^2)`` as
``max(sqrt(V̂), eps1)``, the same number without squaring eps1.

**Cost.** Per parameter, one param-sized float32 scratch buffer (``Q``, reused for ``V̂`` and
``U``) and the row/column reductions in float32 through ``backend.xp``; the tail (decay,
scaling, momentum, apply) is one fused op (``csrc/adafactor.cuh``) with ``U`` in the grad
position. Parameters are stepped one at a time, not in one multi-tensor launch: each needs
two reductions (``RMS(theta)``, ``RMS(U)``) read back as host scalars before its tail can
run, and one at a time bounds the scratch memory by the largest parameter instead of the
sum of all — the memory Adafactor exists to save.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..hyperparams import Hyperparams, check_lr, check_weight_decay
from ..ops import Launch, Op
from .base import Algorithm, StepItem

PAPER_LR = 1e-2  # the paper's cap on the relative step size, min(1e-2, 1/sqrt(t))
FLOAT32_EPS = float(np.finfo(np.float32).eps)  # torch's eps1=None for float32 parameters


def _reference(p: np.ndarray, u: np.ndarray, slots: Sequence[np.ndarray], a) -> None:
    p *= a.decay
    p -= a.step * u


def _reference_momentum(p: np.ndarray, u: np.ndarray, slots: Sequence[np.ndarray], a) -> None:
    (m,) = slots
    m[...] = m + a.one_minus_beta1 * (a.step * u - m)
    p *= a.decay
    p -= m


# `grad` of both launches is the preconditioned update U (a scratch buffer), not the gradient.
ADAFACTOR = Op("adafactor", (), ("decay", "step"), _reference)
ADAFACTOR_MOMENTUM = Op(
    "adafactor_momentum", ("exp_avg",), ("decay", "step", "one_minus_beta1"), _reference_momentum
)


@dataclass(frozen=True)
class AdafactorHyperparams(Hyperparams):
    algorithm = "adafactor"
    # None: the paper's relative step. __init__ takes None and __post_init__ stores PAPER_LR
    # in its place (after validate), so a constructed instance's lr is a float, as the base
    # declares; a dataclass field cannot type its __init__ parameter wider than the attribute.
    lr: float | None = PAPER_LR  # type: ignore[assignment]
    beta2_decay: float = -0.8
    eps: tuple[float | None, float] = (1e-30, 1e-3)  # (eps1, eps2); eps1 None: float32 eps
    # Update clipping threshold; inf: no clipping. None is accepted for inf and to_dict gives
    # None back: JSON has no Infinity, so what a server echoes can be registered again.
    d: float = 1.0
    weight_decay: float = 0.0
    beta1: float | None = None  # None: no first moment
    relative_step: bool = True
    scale_parameter: bool = True
    eps1_floor: bool = False  # True: torch.optim.Adafactor's placement of eps1

    def __post_init__(self) -> None:
        eps = self.eps
        if isinstance(eps, (tuple, list)) and len(eps) == 2 and eps[0] is None:
            object.__setattr__(self, "eps", (FLOAT32_EPS, eps[1]))
        if self.d is None:
            object.__setattr__(self, "d", math.inf)
        super().__post_init__()
        if self.lr is None:
            object.__setattr__(self, "lr", PAPER_LR)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        if out["d"] == math.inf:
            out["d"] = None
        return out

    def validate(self) -> None:
        if self.lr is None:
            if not self.relative_step:
                raise ValueError("lr=None needs relative_step=True (it means the relative step)")
        else:
            check_lr(self.lr)
        if not (math.isfinite(self.beta2_decay) and self.beta2_decay <= 0.0):
            raise ValueError(f"beta2_decay should be <= 0 but is: {self.beta2_decay}")
        eps1, eps2 = self.eps
        assert eps1 is not None  # __post_init__ put FLOAT32_EPS in its place
        if not (math.isfinite(eps1) and eps1 >= 0.0):
            raise ValueError(f"epsilon1 should be >= 0 but is: {eps1}")
        if not (math.isfinite(eps2) and eps2 >= 0.0):
            raise ValueError(f"epsilon2 should be >= 0 but is: {eps2}")
        if not self.d >= 1.0:
            raise ValueError(f"Clipping threshold d should be >= 1 but is: {self.d}")
        check_weight_decay(self.weight_decay)
        if self.beta1 is not None and not 0.0 <= self.beta1 < 1.0:
            raise ValueError(f"Invalid beta1 value: {self.beta1}")


def _flat(a: Any) -> Any:
    return a.reshape(-1)  # contiguous: a view, written through in place


# Elements per dot product of an RMS: BLAS and cuBLAS take the length as a 32-bit int, so a
# tensor of 2^31+ elements is summed in chunks (float32 each, the partial sums in float64).
_DOT_CHUNK = 1 << 30


def _rms(xp: Any, x: Any) -> float:
    flat = _flat(x)
    if flat.size <= _DOT_CHUNK:  # one dot: the same float32 sum as ever
        return math.sqrt(float(xp.dot(flat, flat)) / flat.size)
    total = xp.zeros((), dtype=np.float64)  # on the device until the one fetch below
    for lo in range(0, flat.size, _DOT_CHUNK):
        chunk = flat[lo : lo + _DOT_CHUNK]
        total = total + xp.dot(chunk, chunk).astype(np.float64)
    return math.sqrt(float(total) / flat.size)


class Adafactor(Algorithm):
    name = "adafactor"
    hyperparams = AdafactorHyperparams
    hp: AdafactorHyperparams

    def slot_shapes(self, shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
        if len(shape) >= 2:
            slots = {"exp_avg_sq_row": shape[:-1], "exp_avg_sq_col": shape[:-2] + shape[-1:]}
        else:
            slots = {"exp_avg_sq": shape}
        if self.hp.beta1 is not None:
            slots["exp_avg"] = shape
        return slots

    def op(self) -> Op:
        return ADAFACTOR if self.hp.beta1 is None else ADAFACTOR_MOMENTUM

    def step(self, backend: Any, items: Sequence[StepItem], t: int) -> None:
        hp, xp, op = self.hp, backend.xp, self.op()
        eps2 = hp.eps[1]
        for it in items:
            if math.prod(it.shape) == 0:
                continue
            rho = min(it.lr, 1.0 / math.sqrt(t)) if hp.relative_step else it.lr
            alpha = rho * max(eps2, _rms(xp, it.param)) if hp.scale_parameter else rho
            beta2t = 0.0 if it.fresh else 1.0 - t**hp.beta2_decay
            u = self._precondition(xp, it, beta2t)
            step = alpha / max(1.0, _rms(xp, u) / hp.d)
            scalars = {
                "decay": 1.0 - it.lr * hp.weight_decay,
                "step": step,
                "one_minus_beta1": 1.0 - (hp.beta1 or 0.0),
            }
            slots = [_flat(it.slots[s]) for s in op.slots]
            backend.launch(op, [Launch(_flat(it.param), _flat(u), slots, op.pack(scalars))])

    def _precondition(self, xp: Any, it: StepItem, beta2t: float) -> Any:
        """Update the second moment of ``it`` and return ``U = G / sqrt(V̂)`` (a new array)."""
        eps1, floor = self.hp.eps[0], self.hp.eps1_floor
        assert eps1 is not None  # __post_init__ stores FLOAT32_EPS for eps1=None
        one_minus_beta2t = 1.0 - beta2t
        if len(it.shape) < 2:
            g, v = _flat(it.grad), _flat(it.slots["exp_avg_sq"])
            q = xp.multiply(g, g)
            if not floor:
                q += eps1
            v *= beta2t
            q *= one_minus_beta2t
            v += q
            xp.sqrt(v, out=q)
            if floor:
                xp.maximum(q, eps1, out=q)
            return xp.divide(g, q, out=q)

        g = it.grad.reshape(it.shape)
        row, col = it.slots["exp_avg_sq_row"], it.slots["exp_avg_sq_col"]
        q = xp.multiply(g, g)
        if not floor:
            q += eps1
        row *= beta2t
        row += one_minus_beta2t * q.mean(axis=-1)
        col *= beta2t
        col += one_minus_beta2t * q.mean(axis=-2)
        # V̂ = R C / mean(R), the mean over the rows of each slice (NOT the sum: see above).
        # sqrt(V̂) is formed as sqrt(R / mean R) sqrt(C), as HF transformers does, never V̂:
        # with eps1 = 1e-30 a dead row's R times a dead column's C is ~1e-60, 0 in float32.
        row_mean = row.mean(axis=-1, keepdims=True)
        if floor:
            row_mean = xp.maximum(row_mean, eps1)
        xp.multiply(xp.sqrt(row / row_mean)[..., :, None], xp.sqrt(col)[..., None, :], out=q)
        if floor:
            # torch's max(V̂, eps1^2) before the root, without squaring eps1 (underflow again)
            xp.maximum(q, eps1, out=q)
        return xp.divide(g, q, out=q)
