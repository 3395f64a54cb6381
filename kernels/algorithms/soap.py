r"""SOAP: Adam in the eigenbasis of Shampoo's preconditioner (Vyas et al. 2024, 2409.11321),
as the authors' reference code (github.com/nikhilvyas/SOAP) and ``pytorch_optimizer.SOAP``.

For a matrix gradient ``G`` (``m x n``) with Kronecker factors ``L`` (``m x m``) and ``R``
(``n x n``), their eigenbases ``Q_L``, ``Q_R``, Adam step ``s = t - 1`` and ``w = 1 - beta``:

.. math::
    M &\leftarrow M + w_1 (G - M) \\
    \tilde G &= Q_L^\top G Q_R, \qquad \tilde M = Q_L^\top M Q_R \\
    V &\leftarrow V + w_2 (\tilde G^2 - V) \\
    U &= Q_L \frac{\tilde M}{\sqrt V + \epsilon} Q_R^\top
         \quad \Big( U \leftarrow \frac{U}{\sqrt{\mathrm{mean}(U^2)} + \epsilon}
         \text{ if normalize\_grads} \Big) \\
    \theta &\leftarrow \big(\theta - \eta \frac{\sqrt{1 - \beta_2^s}}{1 - \beta_1^s} U\big)
         (1 - \eta \lambda) \\
    L &\leftarrow L + w_s (G G^\top - L), \qquad R \leftarrow R + w_s (G^\top G - R)

``lerp`` is torch's (``b - (b - a)(1 - w)`` for ``w >= 0.5``), ``w_s = 1 - shampoo_beta``
(``shampoo_beta`` None, ``pytorch_optimizer``'s spelling of the authors' -1: ``betas[1]``).
The first moment ``M`` lives in the parameter's own basis and is projected every step, so
it follows every change of basis exactly (the authors' "re-project the moments"); the
second moment ``V`` lives in the eigenbasis and is only permuted when the basis is
refreshed (the authors' approximation).

- **First step of a name: statistics only.** ``L, R`` take ``G`` and ``Q = eigh`` of them
  (columns flipped to descending eigenvalues, ``eigh(L + 1e-30 I)`` in float32 with a
  float64 retry, exactly as the reference); the parameter does not move, so the update never
  uses a basis built from its own gradient.
- **Refresh** after the factor update of every step with ``s > 0`` and
  ``s % precondition_frequency == 0``: one power iteration and QR per factor,
  ``P = L Q``, ``e = diag(Q^T P)``, ``π = argsort(e)`` descending, ``Q <- qr(P[:, π])``,
  and ``V`` permuted by ``π`` along that dimension. eigh runs only at the first step.
- **Which dimensions are preconditioned.** A dimension larger than ``max_precond_dim`` keeps
  the identity on its side (no factor); 1-D parameters take the identity unless
  ``precondition_1d`` (and ``n <= max_precond_dim``); 0-d parameters always do. With the
  identity on every side this is Adam (with SOAP's skipped first step and step count).
  ``merge_dims`` first reshapes an n-D tensor (a 4-D one from NHWC to NCHW when
  ``data_format = "channels_last"``) by greedily merging neighbouring dimensions while the
  product stays ``<= max_precond_dim`` (the authors' ``merge_dims``), e.g. ``(3, 5, 7)`` with
  16 to ``(15, 7)``, ``(4, 4)`` with 10000 to ``(16,)`` (one 16 x 16 factor).
  ``data_format`` has no other effect.

Slots (all float32): ``exp_avg`` (``M``) and ``exp_avg_sq`` (``V``, laid out like the
parameter, in the eigenbasis), and for each preconditioned dimension ``k`` of the (merged)
shape ``GG{k}`` (the factor, ``d_k x d_k``) and ``Q{k}`` (its eigenbasis): for a matrix
``GG0 = L``, ``GG1 = R``, ``Q0 = Q_L``, ``Q1 = Q_R``.

Step counting follows rlx-optim: ``s = t - 1`` is the global step less the skipped first
one, as the reference's group step (floored at 1, so a name stepped twice within one
iteration cannot divide by zero). A name that appears after step 1 is skipped on its own
first step too (as in the authors' per-parameter code), then uses the global ``s`` for bias
correction and refreshes, as every algorithm here does for late names.

Where the two references differ, and what is left out:

- ``merge_dims``: the authors' merge. ``pytorch_optimizer`` 4.1.0's ``merge_small_dims`` can
  add size-1 dimensions (their 1 x 1 factors are exact no-ops) and crashes when everything
  merges into one dimension, e.g. any 1-D parameter or a ``(4, 4)`` one under the default
  ``max_precond_dim``; the authors' code handles both.
- ``normalize_grads`` adds ``eps`` to the RMS, as ``pytorch_optimizer`` (the authors add 1e-30).
- Weight decay multiplies by ``1 - eta lambda`` after the update, as ``pytorch_optimizer``
  (the authors add ``-eta lambda theta``: the same up to rounding).
- Not supported: ``maximize`` (negate the gradient instead), per-parameter step counters,
  dtypes other than float32, and the later revision of the reference repository (bf16
  state, ``warmup_steps``, debiased betas), which ``pytorch_optimizer`` does not follow.

Elementwise parts are fused ops (``csrc/soap.cuh``): the first-moment and factor ``lerp``,
the second moment with the Adam division in the eigenbasis, and the final update with decay
— each one pass over memory, batched over the step's tensors. The projections, outer
products, eigh and QR run through ``backend.xp`` (BLAS/LAPACK or cuBLAS/cuSOLVER) in
float32, as the reference runs them for float32 parameters. Eigenvectors are unique only
up to sign (which cancels: every column enters the update twice) and, for repeated
eigenvalues, up to a rotation within their eigenspace (which does not cancel: a rank-
deficient first-step factor, e.g. ``L`` of a tall matrix, gives results that depend on the
LAPACK in use, here and in the reference alike).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np

from ..hyperparams import Hyperparams, check_betas, check_eps, check_lr, check_weight_decay
from ..ops import Launch, Op
from .base import Algorithm, StepItem

DATA_FORMATS = ("channels_first", "channels_last")
EIGH_JITTER = 1e-30  # added to the diagonal before eigh, as the reference does


def _lerp(a: np.ndarray, b: np.ndarray, w: np.float32) -> np.ndarray:
    # torch.lerp, in float32 (w is a float32 scalar): exact at w = 0 and w = 1.
    return a + w * (b - a) if w < 0.5 else b - (b - a) * (np.float32(1.0) - w)


def _reference_lerp(p: np.ndarray, g: np.ndarray, slots: Sequence[np.ndarray], a) -> None:
    p[...] = _lerp(p, g, a.weight)


def _reference_precondition(p: np.ndarray, g: np.ndarray, slots: Sequence[np.ndarray], a) -> None:
    (v,) = slots
    v[...] = _lerp(v, g * g, a.weight)
    p[...] = p / (np.sqrt(v) + a.eps)


def _reference_apply(p: np.ndarray, u: np.ndarray, slots: Sequence[np.ndarray], a) -> None:
    p[...] = p + a.neg_step_size * (u / a.norm)
    p *= a.decay


SOAP_LERP = Op("soap_lerp", (), ("weight",), _reference_lerp)
# `param` of a SOAP_PRECONDITION launch is the projected first moment (scratch, in/out),
# `grad` the projected gradient.
SOAP_PRECONDITION = Op(
    "soap_precondition", ("exp_avg_sq",), ("weight", "eps"), _reference_precondition
)
# `grad` of a SOAP_APPLY launch is the update projected back to the parameter's basis.
SOAP_APPLY = Op("soap_apply", (), ("neg_step_size", "norm", "decay"), _reference_apply)


@dataclass(frozen=True)
class SoapHyperparams(Hyperparams):
    algorithm = "soap"
    lr: float = 3e-3
    betas: tuple[float, float] = (0.95, 0.95)
    shampoo_beta: float | None = None  # the factors' EMA; None: betas[1]
    eps: float = 1e-8
    weight_decay: float = 1e-2
    precondition_frequency: int = 10
    max_precond_dim: int = 10000
    merge_dims: bool = False
    precondition_1d: bool = False
    normalize_grads: bool = False
    data_format: str = "channels_first"
    correct_bias: bool = True

    def validate(self) -> None:
        check_lr(self.lr)
        check_betas(self.betas)
        if self.shampoo_beta is not None and not 0.0 <= self.shampoo_beta < 1.0:
            raise ValueError(f"Invalid shampoo_beta value: {self.shampoo_beta}")
        check_eps(self.eps)
        check_weight_decay(self.weight_decay)
        if self.precondition_frequency < 1:
            raise ValueError(f"Invalid precondition_frequency value: {self.precondition_frequency}")
        if self.max_precond_dim < 1:
            raise ValueError(f"Invalid max_precond_dim value: {self.max_precond_dim}")
        if self.data_format not in DATA_FORMATS:
            raise ValueError(
                f"Invalid data_format value: {self.data_format!r} "
                f"(expected one of {', '.join(map(repr, DATA_FORMATS))})"
            )


def merge_small_dims(shape: Sequence[int], max_dim: int) -> tuple[int, ...]:
    """The authors' ``merge_dims``: merge neighbours while the product stays ``<= max_dim``.

    A dimension larger than ``max_dim`` stays on its own; size-1 leftovers are dropped.
    """
    merged: list[int] = []
    current = 1
    for d in shape:
        if current * d > max_dim:
            if current > 1:
                merged.append(current)
                current = d
            else:
                merged.append(d)
                current = 1
        else:
            current *= d
    if current > 1 or not merged:
        merged.append(current)
    return tuple(merged)


@dataclass(frozen=True)
class Layout:
    """How a parameter of ``shape`` is preconditioned.

    ``pshape`` is the shape the factors act on (``shape``, or its merge); ``permuted`` says
    that the NHWC -> NCHW permutation comes first; ``factors[k]`` is the size of dimension
    ``k``'s factor, or None where that side keeps the identity.
    """

    shape: tuple[int, ...]
    pshape: tuple[int, ...]
    permuted: bool
    factors: tuple[int | None, ...]

    @property
    def preconditioned(self) -> bool:
        return any(f is not None for f in self.factors)


@cache
def layout(
    shape: tuple[int, ...],
    max_precond_dim: int,
    merge_dims: bool,
    precondition_1d: bool,
    channels_last: bool,
) -> Layout:
    def side(d: int) -> int | None:
        return d if 0 < d <= max_precond_dim else None

    if len(shape) == 0:
        return Layout(shape, shape, False, ())
    if len(shape) == 1:
        return Layout(shape, shape, False, (side(shape[0]) if precondition_1d else None,))
    permuted = False
    pshape = shape
    if merge_dims and math.prod(shape) > 0:
        if channels_last and len(shape) == 4:
            permuted = True
            pshape = (shape[0], shape[3], shape[1], shape[2])
        pshape = merge_small_dims(pshape, max_precond_dim)
    return Layout(shape, pshape, permuted, tuple(side(d) for d in pshape))


def _to_pshape(x: Any, lay: Layout) -> Any:
    """A parameter-shaped array in the layout the factors act on (a view unless permuted)."""
    if lay.permuted:
        x = x.transpose(0, 3, 1, 2)
    return x.reshape(lay.pshape)


def _from_pshape(y: Any, lay: Layout) -> Any:
    if lay.permuted:
        n, h, w, c = lay.shape
        return y.reshape(n, c, h, w).transpose(0, 2, 3, 1)
    return y.reshape(lay.shape)


def _flat(a: Any) -> Any:
    return a.reshape(-1)


class Soap(Algorithm):
    name = "soap"
    linear_cost = False
    hyperparams = SoapHyperparams
    hp: SoapHyperparams

    def layout(self, shape: tuple[int, ...]) -> Layout:
        hp = self.hp
        return layout(
            tuple(shape),
            hp.max_precond_dim,
            hp.merge_dims,
            hp.precondition_1d,
            hp.data_format == "channels_last",
        )

    def slot_shapes(self, shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
        slots = {"exp_avg": shape, "exp_avg_sq": shape}
        for k, d in enumerate(self.layout(shape).factors):
            if d is not None:
                slots[f"GG{k}"] = (d, d)
                slots[f"Q{k}"] = (d, d)
        return slots

    # -- step ----------------------------------------------------------------------------

    def step(self, backend: Any, items: Sequence[StepItem], t: int) -> None:
        live = [it for it in items if math.prod(it.shape) > 0]
        warm = [it for it in live if not it.fresh]
        s = max(t - 1, 1)
        if warm:
            self._adam(backend, warm, s)
        # The factors take this step's gradient after the update, so that gradient is never
        # part of the basis it is projected with.
        self._update_factors(backend, live)
        for it in live:
            if it.fresh:
                self._init_bases(backend.xp, it)
        if s % self.hp.precondition_frequency == 0:
            for it in warm:
                self._refresh_bases(backend.xp, it)

    def _bases(self, it: StepItem, lay: Layout) -> list[Any]:
        return [None if d is None else it.slots[f"Q{k}"] for k, d in enumerate(lay.factors)]

    def _project(self, xp: Any, x: Any, lay: Layout, bases: list[Any], back: bool) -> Any:
        """``x`` (parameter-shaped) into the eigenbasis (``Q^T x`` on every side) or back."""
        if not lay.preconditioned:
            return x
        y = _to_pshape(x, lay)
        # Contract dimension 0 each time: the new axis goes last, so after all of them the
        # axes are back in order (the reference's tensordot loop).
        for q in bases:
            if q is None:
                y = xp.moveaxis(y, 0, -1)
            else:
                y = xp.tensordot(y, q, axes=([0], [1 if back else 0]))
        return _from_pshape(y, lay)

    def _adam(self, backend: Any, items: Sequence[StepItem], s: int) -> None:
        hp, xp = self.hp, backend.xp
        beta1, beta2 = hp.betas
        # 1. The first moment, in the parameter's basis, for all tensors in one launch.
        lerp1 = SOAP_LERP.pack({"weight": 1.0 - beta1})
        backend.launch(
            SOAP_LERP,
            [Launch(_flat(it.slots["exp_avg"]), _flat(it.grad), [], lerp1) for it in items],
        )
        # 2. Project gradient and first moment; 3. second moment and Adam's division in the
        # eigenbasis, one launch (the projected first moment is overwritten by the ratio).
        precondition = SOAP_PRECONDITION.pack({"weight": 1.0 - beta2, "eps": hp.eps})
        ratios, launches = [], []
        for it in items:
            lay = self.layout(it.shape)
            bases = self._bases(it, lay)
            g = self._project(xp, it.grad.reshape(it.shape), lay, bases, back=False)
            m = self._project(xp, it.slots["exp_avg"], lay, bases, back=False)
            # The launch writes `m`: a fresh C-contiguous buffer (without a preconditioned
            # side `m` is still the slot itself, so copy it).
            m = xp.ascontiguousarray(m) if lay.preconditioned else m.copy()
            ratios.append(m)
            g = _flat(xp.ascontiguousarray(g))
            launches.append(Launch(_flat(m), g, [_flat(it.slots["exp_avg_sq"])], precondition))
        backend.launch(SOAP_PRECONDITION, launches)
        # 4. Back to the parameter's basis; 5. the update and decay in one launch.
        if hp.correct_bias:
            factor = math.sqrt(1.0 - math.pow(beta2, s)) / (1.0 - math.pow(beta1, s))
        else:
            factor = 1.0
        launches = []
        for it, ratio in zip(items, ratios, strict=True):
            lay = self.layout(it.shape)
            u = self._project(xp, ratio, lay, self._bases(it, lay), back=True)
            u = xp.ascontiguousarray(u)
            norm = 1.0
            if hp.normalize_grads:
                # float32 throughout, as the reference: sqrt(mean(u^2)) + eps.
                norm = float(xp.sqrt(xp.mean(u * u)) + np.float32(hp.eps))
            args = SOAP_APPLY.pack(
                {
                    "neg_step_size": -(it.lr * factor),
                    "norm": norm,
                    "decay": 1.0 - hp.weight_decay * it.lr,
                }
            )
            launches.append(Launch(_flat(it.param), _flat(u), [], args))
        backend.launch(SOAP_APPLY, launches)

    def _update_factors(self, backend: Any, items: Sequence[StepItem]) -> None:
        """``GG_k <- lerp(GG_k, G_(k) G_(k)^T, 1 - shampoo_beta)`` for every factor."""
        hp, xp = self.hp, backend.xp
        beta = hp.betas[1] if hp.shampoo_beta is None else hp.shampoo_beta
        row = SOAP_LERP.pack({"weight": 1.0 - beta})
        launches = []
        for it in items:
            lay = self.layout(it.shape)
            if not lay.preconditioned:
                continue
            g = _to_pshape(it.grad.reshape(it.shape), lay)
            for k, d in enumerate(lay.factors):
                if d is None:
                    continue
                if g.ndim == 1:
                    outer = g[:, None] * g[None, :]  # exact products, as torch's n x 1 @ 1 x n
                else:
                    rest = [i for i in range(g.ndim) if i != k]
                    outer = xp.tensordot(g, g, axes=(rest, rest))
                outer = _flat(xp.ascontiguousarray(outer, dtype=np.float32))
                launches.append(Launch(_flat(it.slots[f"GG{k}"]), outer, [], row))
        if launches:
            backend.launch(SOAP_LERP, launches)

    def _init_bases(self, xp: Any, it: StepItem) -> None:
        lay = self.layout(it.shape)
        for k, d in enumerate(lay.factors):
            if d is not None:
                it.slots[f"Q{k}"][...] = eigenbasis(xp, it.slots[f"GG{k}"])

    def _refresh_bases(self, xp: Any, it: StepItem) -> None:
        """One power iteration + QR per factor; ``exp_avg_sq`` follows the new order."""
        lay = self.layout(it.shape)
        if not lay.preconditioned:
            return
        v_slot = it.slots["exp_avg_sq"]
        v = _to_pshape(v_slot, lay)
        for k, d in enumerate(lay.factors):
            if d is None:
                continue
            gg, q = it.slots[f"GG{k}"], it.slots[f"Q{k}"]
            power = gg @ q
            estimate = (q * power).sum(axis=0)  # diag(Q^T GG Q): the eigenvalue estimates
            order = xp.argsort(-estimate)  # descending, as the eigh basis is ordered
            v = xp.take(v, order, axis=k)
            q[...] = orthonormal_basis(xp, power[:, order])
        v_slot[...] = _from_pshape(v, lay)


def _finite(xp: Any, x: Any) -> bool:
    return bool(xp.isfinite(x).all())


def eigenbasis(xp: Any, factor: Any) -> Any:
    """Eigenvectors of the symmetric ``factor``, by descending eigenvalue (the reference's
    ``eigh(factor + 1e-30 I)`` in float32, retried in float64 if it does not converge).

    Non-convergence is LAPACK's ``LinAlgError`` on the CPU; cuSOLVER's is silent (CuPy
    ignores linalg errors by default) and leaves NaN, so a non-finite result counts too."""
    d = factor.shape[0]
    try:
        _, vectors = xp.linalg.eigh(factor + xp.eye(d, dtype=np.float32) * np.float32(EIGH_JITTER))
        ok = _finite(xp, vectors)
    except np.linalg.LinAlgError:
        ok = False
    if not ok:
        wide = factor.astype(np.float64) + xp.eye(d, dtype=np.float64) * EIGH_JITTER
        vectors = xp.linalg.eigh(wide)[1].astype(np.float32)
    return vectors[:, ::-1]


def orthonormal_basis(xp: Any, power: Any) -> Any:
    """``Q`` of ``qr(power)`` in float32, retried in float64 when the float32 result is not
    finite (a silent cuSOLVER failure, see :func:`eigenbasis`)."""
    q = xp.linalg.qr(power)[0]
    if not _finite(xp, q):
        q = xp.linalg.qr(power.astype(np.float64))[0].astype(np.float32)
    return q
