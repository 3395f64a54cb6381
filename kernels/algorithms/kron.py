r"""Kron-PSGD: preconditioned SGD with a Kronecker-factored preconditioner (Li 2015, 1512.04202;
Li 2018, 1809.10232), in the "kron" form of kron_torch / pytorch-optimizer's ``Kron``.

A matrix parameter ``m x n`` with gradient ``g`` keeps an exponential momentum ``b`` and two
upper-triangular factors ``Q_L`` (``m x m``) and ``Q_R`` (``n x n``); the preconditioner is
``P = Q_L^T Q_L \otimes Q_R^T Q_R``, i.e. ``P G = Q_L^T Q_L G Q_R^T Q_R``.

.. math::
    b &\leftarrow \mu b + (1 - \mu) g, \qquad G = b / (1 - \mu^t) \\
    \text{(update step)}\quad
    A &= Q_L H Q_R^T, \qquad B = Q_L^{-T} V Q_R^{-1}, \qquad V \sim \mathcal N(0, I) \\
    Q_L &\leftarrow Q_L - \frac{\eta_p}{\|A A^T + B B^T\|_{lb} + \epsilon}
        \mathrm{triu}(A A^T - B B^T)\, Q_L \\
    Q_R &\leftarrow Q_R - \frac{\eta_p}{\|A^T A + B^T B\|_{lb} + \epsilon}
        \mathrm{triu}(A^T A - B^T B)\, Q_R \\
    U &= Q_L^T Q_L\, G\, Q_R^T Q_R, \qquad
        U \leftarrow U \min\!\Big(1, \frac{c}{\mathrm{rms}(U) + 10^{-6}}\Big) \\
    \theta &\leftarrow \theta - \eta\,(U + \lambda \theta)

``H`` is the debiased momentum ``G`` (``momentum_into_precond_update``, default, as kron_torch)
or the raw gradient ``g``. Both factors are updated from ``A, B`` computed with the old
factors. ``\|\cdot\|_{lb}`` is kron_torch's cheap lower bound of the spectral norm
(:func:`norm_lower_bound`), ``\epsilon`` the float32 ``tiny``, ``\eta_p`` = ``precond_lr``
(a step normalised to [0, 1]). The fixed point of the update is ``P E[H H^T] P = E[V V^T]``
(whitening: the preconditioned gradients have identity covariance), reached in the
Kronecker-factored sense. Before each update both factors are rescaled to the geometric mean
of their max-abs norms (balancing: it leaves ``P`` unchanged and keeps either factor from
drifting towards under/overflow); kron_torch balances with probability 0.01, we at every
update (it costs O(n^2)).

- **Update schedule.** ``Q`` is updated at global step ``t`` iff
  ``floor(t p) > floor((t - 1) p)`` with ``p`` = ``precond_update_prob`` (default 1: every
  step; ``p = 1/k``: every k-th step, as kron_torch's counter). Deterministic in ``t``.
- **Noise.** ``V`` is drawn from a generator seeded by ``(seed, name, t)``
  (:func:`probe_noise`), so a resumed run is bit-identical and no RNG state is kept.
- **Init.** On a parameter's first step ``Q_L = Q_R = \sqrt{s} I`` with ``s`` =
  ``precond_init_scale`` (so ``P = s^2 I``, kron_torch's convention).
- **Diagonal sides.** A side whose dimension is 1 or exceeds ``max_size_triangular`` keeps a
  diagonal factor ``d`` (a vector): ``A, B`` use ``diag(d)``, and its update is
  ``d \leftarrow d - \eta_p (\mathrm{diag}(A A^T) - \mathrm{diag}(B B^T)) d /
  (\max|\mathrm{diag}(A A^T + B B^T)| + \epsilon)`` (kron_torch's).
- **Update clipping.** ``c`` = ``clip_update_rms`` (default 1.1, kron_torch's constant)
  bounds the RMS of the preconditioned update; ``None`` turns it off.
- **Weight decay** is decoupled: ``\lambda\theta`` is added after preconditioning and
  clipping, as kron_torch does. Unlike kron_torch (which decays only matrices) it applies to
  every parameter; put biases and norms in a group with ``weight_decay=0``.
- **Not matrices.** 0-d, 1-D and >= 3-D parameters are stepped with ``P = I``: debiased
  momentum SGD with the same clipping and decay (kron_torch would give 1-D a diagonal and
  >= 3-D a per-mode preconditioner). A parameter with no elements is left as it is.

Slots (all float32): ``momentum_buffer`` (param-shaped); for matrices also ``q_left``
(``(m, m)``, or ``(m,)`` when diagonal) and ``q_right`` (``(n, n)`` or ``(n,)``). The
momentum is the fused ``kron_momentum`` op (``csrc/kron.cuh``), the decay-and-apply the fused
``sgd`` op (``g <- U + \lambda\theta; \theta <- \theta - \eta g``); the factor algebra runs
through ``backend.xp`` (BLAS / cuBLAS), one parameter at a time. Triangular solves go through
:func:`solve_upper_right` (NumPy only on the CPU: no SciPy).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..hyperparams import Hyperparams, check_lr, check_unit_interval, check_weight_decay
from ..ops import Launch, Op
from .base import Algorithm, StepItem
from .sgd import SGD

TINY = np.float32(np.finfo(np.float32).tiny)
CLIP_EPS = np.float32(1e-6)


def _reference_momentum(p: np.ndarray, g: np.ndarray, slots: Sequence[np.ndarray], a) -> None:
    (buf,) = slots
    buf[...] = buf * a.beta + a.one_minus_beta * g
    p[...] = buf / a.bias_correction


# `param` of a KRON_MOMENTUM launch is the output (the debiased momentum, a scratch buffer).
KRON_MOMENTUM = Op(
    "kron_momentum",
    ("momentum_buffer",),
    ("beta", "one_minus_beta", "bias_correction"),
    _reference_momentum,
)


def solve_upper_right(xp: Any, x: Any, q: Any) -> Any:
    """``x @ inv(q)`` for an upper-triangular ``q``, by a triangular solve (no inverse).

    NumPy has no triangular solver and SciPy is not a dependency: ``x q^-1 = (q^-T x^T)^T``
    and ``q^T`` is lower triangular; reversing both its axes makes it upper triangular, and
    LAPACK's partially pivoted LU of an upper-triangular matrix never pivots (everything
    below the diagonal is an exact zero), so ``np.linalg.solve`` is a plain back-substitution
    on it. CuPy has ``cupyx.scipy.linalg.solve_triangular`` (cuBLAS trsm).
    """
    if xp is np:
        y = np.linalg.solve(q.T[::-1, ::-1], x.T[::-1])
        return y[::-1].T
    from cupyx.scipy.linalg import solve_triangular

    return solve_triangular(q, x.T, trans="T", lower=False).T


def norm_lower_bound(xp: Any, a: Any) -> Any:
    """kron_torch's cheap lower bound of the spectral norm of a square matrix (0-d array).

    Scaled to max-abs 1, one power-iteration-like step from the row (or column) of largest
    norm; never above the spectral norm (up to rounding) and, for the random symmetric
    positive semi-definite Gram matrices it is used on, about 0.77-1.0 of it.
    """
    max_abs = xp.max(xp.abs(a))
    a = a / xp.where(max_abs > 0, max_abs, np.float32(1.0))
    aa = a * a
    col, row = xp.sum(aa, axis=0), xp.sum(aa, axis=1)
    i, j = xp.argmax(col), xp.argmax(row)
    x0 = xp.take(a, i, axis=1) @ a
    bound0 = xp.linalg.norm((x0 / xp.maximum(xp.linalg.norm(x0), TINY)) @ a.T)
    x1 = a @ xp.take(a, j, axis=0)
    bound1 = xp.linalg.norm(a.T @ (x1 / xp.maximum(xp.linalg.norm(x1), TINY)))
    return max_abs * xp.where(xp.max(col) > xp.max(row), bound0, bound1)


def probe_noise(xp: Any, seed: int, name: str, t: int, shape: tuple[int, ...]) -> Any:
    """The standard normal probe ``V`` for parameter ``name`` at global step ``t`` (float32).

    A function of ``(seed, name, t)`` only, so resuming from a checkpoint draws the same
    probes. NumPy and CuPy generators differ, so CPU and GPU runs draw different probes.

    On CuPy the generator is a counter-based Philox keyed by the same triple: CuPy's default
    (XORWOW) sets up each of its ~10^5 cuRAND states by skip-ahead, per matrix per step;
    Philox sets each up in constant time. Keyed per draw (not one generator per step), a
    matrix's probe does not depend on which others are stepped with it, in what order or on
    which shard.
    """
    name_key = int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little")
    key = [seed, name_key, t]
    if xp is np:
        rng = np.random.default_rng(key)
    else:  # seeded through a SeedSequence, as default_rng is
        rng = xp.random.Generator(xp.random.Philox4x3210(key))
    return rng.standard_normal(shape, dtype=np.float32)


def precond_update_due(t: int, prob: float) -> bool:
    """Whether the factors are updated at global step ``t`` (deterministic; see docstring)."""
    return math.floor(t * prob) > math.floor((t - 1) * prob)


# Q_L / Q_R are (k, k) upper-triangular matrices or (k,) diagonals; these apply them to an
# m x n matrix from the side they belong to.
def _ql(q: Any, x: Any) -> Any:  # Q_L x
    return q @ x if q.ndim == 2 else q[:, None] * x


def _ql_t(q: Any, x: Any) -> Any:  # Q_L^T x
    return q.T @ x if q.ndim == 2 else q[:, None] * x


def _qr_t(x: Any, q: Any) -> Any:  # x Q_R^T
    return x @ q.T if q.ndim == 2 else x * q


def _qr(x: Any, q: Any) -> Any:  # x Q_R
    return x @ q if q.ndim == 2 else x * q


def _ql_inv_t(xp: Any, q: Any, x: Any) -> Any:  # Q_L^-T x = (x^T Q_L^-1)^T
    return solve_upper_right(xp, x.T, q).T if q.ndim == 2 else x / q[:, None]


def _qr_inv(xp: Any, x: Any, q: Any) -> Any:  # x Q_R^-1
    return solve_upper_right(xp, x, q) if q.ndim == 2 else x / q


def _gram(a: Any, left: bool, diagonal: bool) -> Any:
    """``A A^T`` (left) or ``A^T A`` (right); only its diagonal for a diagonal factor."""
    if diagonal:
        return (a * a).sum(axis=1 if left else 0)
    return a @ a.T if left else a.T @ a


def _update_factor(xp: Any, q: Any, term1: Any, term2: Any, precond_lr: float) -> None:
    """One normalised gradient step on ``q`` in place (see the module docstring)."""
    lr = np.float32(precond_lr)
    if q.ndim == 2:
        step = xp.triu((term1 - term2) * lr)
        step /= norm_lower_bound(xp, term1 + term2) + TINY
        q -= step @ q
    else:
        step = (term1 - term2) * lr * q
        step /= xp.max(xp.abs(term1 + term2)) + TINY
        q -= step


def update_preconditioner(
    xp: Any, q_left: Any, q_right: Any, h: Any, v: Any, precond_lr: float
) -> None:
    """Balance, then update both factors in place from the matrix ``h`` and the probe ``v``."""
    n_left, n_right = xp.max(xp.abs(q_left)), xp.max(xp.abs(q_right))
    mean = xp.sqrt(n_left * n_right)
    q_left *= mean / n_left
    q_right *= mean / n_right
    a = _qr_t(_ql(q_left, h), q_right)
    b = _ql_inv_t(xp, q_left, _qr_inv(xp, v, q_right))
    terms = [
        (q, _gram(a, left, q.ndim == 1), _gram(b, left, q.ndim == 1))
        for q, left in ((q_left, True), (q_right, False))
    ]
    for q, term1, term2 in terms:
        _update_factor(xp, q, term1, term2, precond_lr)


def precondition(q_left: Any, q_right: Any, g: Any) -> Any:
    """``P g = Q_L^T Q_L g Q_R^T Q_R`` for the matrix ``g`` (a new array)."""
    return _qr(_ql_t(q_left, _qr_t(_ql(q_left, g), q_right)), q_right)


@dataclass(frozen=True)
class KronHyperparams(Hyperparams):
    algorithm = "kron"
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    precond_lr: float = 0.1
    precond_update_prob: float = 1.0
    precond_init_scale: float = 1.0
    max_size_triangular: int = 8192
    clip_update_rms: float | None = 1.1
    momentum_into_precond_update: bool = True
    seed: int = 0

    def validate(self) -> None:
        check_lr(self.lr)
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"Invalid momentum value: {self.momentum}")
        check_weight_decay(self.weight_decay)
        check_unit_interval("precond_lr", self.precond_lr)
        check_unit_interval("precond_update_prob", self.precond_update_prob)
        if not (math.isfinite(self.precond_init_scale) and self.precond_init_scale > 0.0):
            raise ValueError(f"Invalid precond_init_scale value: {self.precond_init_scale}")
        if self.max_size_triangular < 0:
            raise ValueError(f"Invalid max_size_triangular value: {self.max_size_triangular}")
        if self.clip_update_rms is not None and not (
            math.isfinite(self.clip_update_rms) and self.clip_update_rms > 0.0
        ):
            raise ValueError(f"Invalid clip_update_rms value: {self.clip_update_rms}")
        if not 0 <= self.seed < 2**64:
            raise ValueError(f"Invalid seed value: {self.seed}")


class Kron(Algorithm):
    name = "kron"
    linear_cost = False
    hyperparams = KronHyperparams
    hp: KronHyperparams

    def _factor_shape(self, k: int) -> tuple[int, ...]:
        return (k,) if k == 1 or k > self.hp.max_size_triangular else (k, k)

    def slot_shapes(self, shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
        slots = {"momentum_buffer": shape}
        if len(shape) == 2:
            slots["q_left"] = self._factor_shape(shape[0])
            slots["q_right"] = self._factor_shape(shape[1])
        return slots

    def step(self, backend: Any, items: Sequence[StepItem], t: int) -> None:
        hp, xp = self.hp, backend.xp
        items = [it for it in items if math.prod(it.shape) > 0]
        if not items:
            return
        # 1. Momentum for every parameter in one launch; G goes to fresh scratch buffers.
        momentum_args = KRON_MOMENTUM.pack(
            {
                "beta": hp.momentum,
                "one_minus_beta": 1.0 - hp.momentum,
                "bias_correction": 1.0 - hp.momentum**t,
            }
        )
        debiased = [xp.empty(it.grad.size, dtype=np.float32) for it in items]
        backend.launch(
            KRON_MOMENTUM,
            [
                Launch(
                    d, it.grad.reshape(-1), [it.slots["momentum_buffer"].reshape(-1)], momentum_args
                )
                for d, it in zip(debiased, items, strict=True)
            ],
        )
        # 2. Precondition the matrices, 3. clip every update, 4. decay and apply in one launch.
        update = precond_update_due(t, hp.precond_update_prob)
        launches = []
        for d, it in zip(debiased, items, strict=True):
            u = d
            if len(it.shape) == 2:
                g = d.reshape(it.shape)
                q_left, q_right = it.slots["q_left"], it.slots["q_right"]
                if it.fresh:
                    self._init_factor(xp, q_left)
                    self._init_factor(xp, q_right)
                if update:
                    h = g if hp.momentum_into_precond_update else it.grad.reshape(it.shape)
                    v = probe_noise(xp, hp.seed, it.name, t, it.shape)
                    update_preconditioner(xp, q_left, q_right, h, v, hp.precond_lr)
                u = xp.ascontiguousarray(precondition(q_left, q_right, g)).reshape(-1)
            if hp.clip_update_rms is not None:
                rms = xp.sqrt(xp.mean(xp.square(u)))
                u *= xp.minimum(np.float32(hp.clip_update_rms) / (rms + CLIP_EPS), np.float32(1))
            args = SGD.pack({"neg_lr": -it.lr, "weight_decay": hp.weight_decay})
            launches.append(Launch(it.param.reshape(-1), u, [], args))
        backend.launch(SGD, launches)

    def _init_factor(self, xp: Any, q: Any) -> None:
        scale = np.float32(math.sqrt(self.hp.precond_init_scale))
        if q.ndim == 2:
            q[...] = xp.eye(q.shape[0], dtype=np.float32) * scale
        else:
            q[...] = scale
