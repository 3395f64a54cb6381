r"""Muon: momentum orthogonalised by Newton–Schulz (Jordan 2024; Liu et al. 2025, 2502.16982),
in ``torch.optim.Muon``'s formulation, with AdamW for the parameters that are not matrices.

Matrices (``len(shape) >= 2``; ``G`` is the gradient viewed as ``rows x cols``):

.. math::
    B &\leftarrow B + (1 - \mu)(G - B) \\
    U &\leftarrow \begin{cases} B + (1 - \mu)(G - B) = G + \mu (B - G) & \text{Nesterov} \\
                                B & \text{otherwise} \end{cases} \\
    O &\leftarrow \mathrm{NS}_k(U) \\
    \theta &\leftarrow \theta (1 - \eta \lambda) - \eta\, s(\text{rows}, \text{cols})\, O

The momentum is an exponential average (torch and Jordan's form). Liu et al. accumulate
``B = mu B + G`` instead; the two differ by the factor ``1 - mu``, which the normalisation in
``NS`` removes (up to ``eps``), so the update is the same.

``NS_k`` is :func:`newton_schulz_orth`: ``X = U / (||U||_F + eps)`` (the spectral norm is then
<= 1), transposed first when ``rows > cols`` so the Gram matrix is the small one, then ``k``
quintic steps ``A = X X^T``, ``X <- a X + (b A + c A^2) X`` with ``(a, b, c) = (3.4445,
-4.7750, 2.0315)``, all in float32. It maps ``U = P S Q^T`` to about ``P S' Q^T`` with ``S'``
in roughly [0.68, 1.14] for singular values above ~5 % of ``||U||_F``: an approximate
orthogonalisation, not ``P Q^T``. torch clamps the norm, ``max(||U||_F, eps)``, and runs the
iteration in bfloat16; we add ``eps`` as Jordan's reference does and stay in float32.

The shape-dependent scale ``s`` (``adjust_lr_fn``, the same options as ``torch.optim.Muon``):

- ``"original"`` (default, Jordan's and torch's default): ``s = sqrt(max(1, rows / cols))``;
- ``"match_rms_adamw"`` (Liu et al.): ``s = 0.2 sqrt(max(rows, cols))``, which gives the update
  the RMS of a typical AdamW update, so AdamW's lr and weight decay carry over.

The weight decay is decoupled and uses the unscaled lr ``eta`` (as torch and Liu et al. do).
A parameter with three or more dimensions is treated as the matrix
``(shape[0], prod(shape[1:]))`` (e.g. a conv kernel ``(out, in, kh, kw)`` as ``out x in*kh*kw``);
torch.optim.Muon refuses such parameters. A matrix with no elements is left as it is.

Everything else (0-d and 1-D: biases, norm gains, scalars) takes AdamW with its own
hyperparameters, the usual "Muon for matrices, AdamW for the rest" in one group config:

.. math::
    \theta &\leftarrow \theta (1 - \eta_a \lambda_a) \\
    m &\leftarrow m + (1 - \beta_1)(g - m) \\
    v &\leftarrow \beta_2 v + (1 - \beta_2) g^2 \\
    \theta &\leftarrow \theta - \frac{\eta_a}{1 - \beta_1^t}
        \frac{m}{\sqrt{v} / \sqrt{1 - \beta_2^t} + \epsilon_a}

exactly :mod:`stepd.kernels.algorithms.adamw` (the fused ``adam`` op) with ``adamw_betas``,
``adamw_eps``, ``adamw_weight_decay``. Its lr ``eta_a`` follows the group's lr: ``eta_a = eta``
when ``adamw_lr`` is None (default), else ``eta_a = eta * adamw_lr / lr`` — ``adamw_lr`` is
the fallback's lr at the configured ``lr``, and ``set_lr`` schedules and ``lr_scale`` multiply
both alike (so ``adamw_lr`` needs ``lr > 0``). The AdamW defaults are torch.optim.AdamW's;
``t`` is the global step, as for :mod:`~kernels.algorithms.adamw`.

Defaults are torch.optim.Muon's: ``lr=1e-3, momentum=0.95, nesterov=True, weight_decay=0.1,
ns_steps=5, eps=1e-7, adjust_lr_fn="original"`` (Jordan uses ``lr=0.02``; with
``"match_rms_adamw"`` an AdamW-tuned lr fits). The NS coefficients are fixed.

Slots: ``momentum_buffer`` (param-shaped) for matrices; ``exp_avg`` and ``exp_avg_sq`` for the
rest. The momentum and the final update are fused elementwise ops (``csrc/muon.cuh``): one
pass over memory each, the same arithmetic on CPU and GPU, and the fused CPU path tested bit
for bit against the NumPy reference. The Newton–Schulz matmuls dominate the cost; they run
through ``backend.xp`` (BLAS / cuBLAS), one parameter at a time.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..hyperparams import Hyperparams, check_betas, check_eps, check_lr, check_weight_decay
from ..ops import Launch, Op
from .adam import ADAM, adam_scalars
from .base import Algorithm, StepItem

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
ADJUST_LR_FNS = ("original", "match_rms_adamw")


def _array_module(a: Any) -> Any:
    if type(a).__module__.split(".")[0] == "cupy":
        import cupy

        return cupy
    return np


def newton_schulz_orth(G: Any, steps: int = 5, eps: float = 1e-7, xp: Any = None) -> Any:
    """Approximately orthogonalise the matrix ``G`` (see the module docstring for the math).

    Returns a new C-contiguous float32 array of ``G``'s shape; ``G`` is not modified.
    ``xp`` is the array module (numpy or cupy), inferred from ``G`` when None.
    """
    if xp is None:
        xp = _array_module(G)
    if G.ndim != 2:
        raise ValueError(f"newton_schulz_orth needs a 2-D matrix, got shape {tuple(G.shape)}")
    a, b, c = NS_COEFFICIENTS
    tall = G.shape[0] > G.shape[1]
    X = xp.array(G.T if tall else G, dtype=np.float32, order="C", copy=True)
    # A 0-d float32 array and Python floats keep every operation in float32 (NEP 50).
    X /= xp.linalg.norm(X) + np.float32(eps)
    for _ in range(steps):
        A = X @ X.T
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    return xp.ascontiguousarray(X.T) if tall else X


def _flat(a: Any) -> Any:
    # Items and slots may be flat or shaped; one flat view each keeps the reference ops'
    # broadcasting trivial (contiguous, so a view, written through in place).
    return a.reshape(-1)


def matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """The 2-D view Muon orthogonalises: ``(shape[0], prod(shape[1:]))``."""
    return shape[0], math.prod(shape[1:])


def adjust_lr_ratio(adjust_lr_fn: str, rows: int, cols: int) -> float:
    """The shape-dependent lr multiplier ``s`` (``torch.optim.Muon``'s ``adjust_lr_fn``)."""
    if adjust_lr_fn == "original":
        return math.sqrt(max(1.0, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    raise ValueError(f"unknown adjust_lr_fn {adjust_lr_fn!r}")


def _reference_momentum(p: np.ndarray, g: np.ndarray, slots: Sequence[np.ndarray], a) -> None:
    (buf,) = slots
    buf[...] = buf + a.one_minus_momentum * (g - buf)
    if a.nesterov != 0:
        p[...] = buf + a.one_minus_momentum * (g - buf)
    else:
        p[...] = buf


def _reference_apply(p: np.ndarray, o: np.ndarray, slots: Sequence[np.ndarray], a) -> None:
    p *= a.decay
    p += a.neg_lr * o


# `param` of a MUON_MOMENTUM launch is the output (the update direction U, a scratch buffer).
MUON_MOMENTUM = Op(
    "muon_momentum", ("momentum_buffer",), ("one_minus_momentum", "nesterov"), _reference_momentum
)
# `grad` of a MUON_APPLY launch is the orthogonalised update O.
MUON_APPLY = Op("muon_apply", (), ("decay", "neg_lr"), _reference_apply)


@dataclass(frozen=True)
class MuonHyperparams(Hyperparams):
    algorithm = "muon"
    lr: float = 1e-3
    momentum: float = 0.95
    nesterov: bool = True
    weight_decay: float = 0.1
    ns_steps: int = 5
    eps: float = 1e-7  # Newton–Schulz normalisation
    adjust_lr_fn: str = "original"
    # The AdamW fallback for 0-d / 1-D parameters (defaults: torch.optim.AdamW's).
    adamw_lr: float | None = None  # None: the same lr as the matrices
    adamw_betas: tuple[float, float] = (0.9, 0.999)
    adamw_eps: float = 1e-8
    adamw_weight_decay: float = 1e-2

    def validate(self) -> None:
        check_lr(self.lr)
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"Invalid momentum value: {self.momentum}")
        check_weight_decay(self.weight_decay)
        if not 1 <= self.ns_steps < 100:
            raise ValueError(f"Invalid ns_steps value: {self.ns_steps} (must be in [1, 99])")
        check_eps(self.eps)
        if self.adjust_lr_fn not in ADJUST_LR_FNS:
            raise ValueError(
                f"Invalid adjust_lr_fn value: {self.adjust_lr_fn!r} "
                f"(expected one of {', '.join(map(repr, ADJUST_LR_FNS))})"
            )
        if self.adamw_lr is not None:
            if not (math.isfinite(self.adamw_lr) and self.adamw_lr >= 0.0):
                raise ValueError(f"Invalid adamw_lr value: {self.adamw_lr}")
            if self.lr == 0.0:
                raise ValueError(
                    "adamw_lr needs lr > 0: the AdamW fallback's lr is lr_t * adamw_lr / lr"
                )
        check_betas(self.adamw_betas)
        if not (math.isfinite(self.adamw_eps) and self.adamw_eps >= 0.0):
            raise ValueError(f"Invalid adamw_eps value: {self.adamw_eps}")
        if not (math.isfinite(self.adamw_weight_decay) and self.adamw_weight_decay >= 0.0):
            raise ValueError(f"Invalid adamw_weight_decay value: {self.adamw_weight_decay}")


class Muon(Algorithm):
    name = "muon"
    linear_cost = False
    hyperparams = MuonHyperparams
    hp: MuonHyperparams

    def slot_shapes(self, shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
        if len(shape) >= 2:
            return {"momentum_buffer": shape}
        return {"exp_avg": shape, "exp_avg_sq": shape}

    def adamw_lr(self, lr: float) -> float:
        """The AdamW fallback's lr for the effective Muon lr ``lr`` (see the docstring)."""
        hp = self.hp
        return lr if hp.adamw_lr is None else lr * (hp.adamw_lr / hp.lr)

    def step(self, backend: Any, items: Sequence[StepItem], t: int) -> None:
        matrices = [it for it in items if len(it.shape) >= 2 and math.prod(it.shape) > 0]
        others = [it for it in items if len(it.shape) < 2]
        if others:
            self._step_adamw(backend, others, t)
        if matrices:
            self._step_matrices(backend, matrices)

    def _step_adamw(self, backend: Any, items: Sequence[StepItem], t: int) -> None:
        hp = self.hp
        rows: dict[float, np.ndarray] = {}
        launches = []
        for it in items:
            if it.lr not in rows:
                lr = self.adamw_lr(it.lr)
                decay = 1.0 - lr * hp.adamw_weight_decay
                rows[it.lr] = ADAM.pack(
                    adam_scalars(t, lr, hp.adamw_betas, hp.adamw_eps, decay=decay, l2=0.0)
                )
            slots = [_flat(it.slots[s]) for s in ADAM.slots]
            launches.append(Launch(_flat(it.param), _flat(it.grad), slots, rows[it.lr]))
        backend.launch(ADAM, launches)

    def _step_matrices(self, backend: Any, items: Sequence[StepItem]) -> None:
        hp, xp = self.hp, backend.xp
        # 1. Momentum for all matrices in one launch; U goes to fresh scratch buffers.
        momentum_args = MUON_MOMENTUM.pack(
            {"one_minus_momentum": 1.0 - hp.momentum, "nesterov": float(hp.nesterov)}
        )
        updates = [xp.empty(it.grad.size, dtype=np.float32) for it in items]
        backend.launch(
            MUON_MOMENTUM,
            [
                Launch(u, _flat(it.grad), [_flat(it.slots["momentum_buffer"])], momentum_args)
                for u, it in zip(updates, items, strict=True)
            ],
        )
        # 2. Orthogonalise each (matmuls), 3. decay and apply all in one launch.
        launches = []
        for u, it in zip(updates, items, strict=True):
            rows, cols = matrix_shape(it.shape)
            o = newton_schulz_orth(u.reshape(rows, cols), hp.ns_steps, hp.eps, xp)
            scale = adjust_lr_ratio(hp.adjust_lr_fn, rows, cols)
            args = MUON_APPLY.pack(
                {"decay": 1.0 - it.lr * hp.weight_decay, "neg_lr": -it.lr * scale}
            )
            launches.append(Launch(_flat(it.param), o.reshape(-1), [], args))
        backend.launch(MUON_APPLY, launches)
