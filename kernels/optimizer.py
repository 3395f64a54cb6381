"""The in-process optimizer: named parameters' state plus the rlx-optim ``Optimizer`` API.

State is created lazily, zero-initialised, the first time a name is stepped. One global step
counter is advanced by :meth:`Optimizer.end_iteration`; inside a step ``t = global_step + 1``.
``lr_scale(name)`` multiplies the learning rate inside the step. Bad input raises before
anything is touched, so a failed call leaves every buffer as it was.

Not thread-safe: a server serialises access per parameter around it.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .algorithms import ALGORITHMS, Algorithm, ElementwiseAlgorithm, StepItem
from .backends import get_backend
from .hyperparams import check_effective_lr, check_lr, check_lr_scale
from .ops import MAX_ARGS, Launch
from .precision import GRAD_DTYPES, negated, widen

StepArgs = tuple[str, Sequence[int], Any, Any]  # (name, shape, param, grad)
_F32 = np.dtype(np.float32)
# Prepared step_batch layouts kept per optimizer: one per name for a loop of single steps
# (the rlx-optim trait's way), so this covers models of thousands of tensors.
MAX_PLANS = 4096
# The args of the Launches a layout is prepared from: a prepared launch takes its scalars
# per run, so these are never read.
_NO_ARGS = np.zeros(MAX_ARGS, np.float32)


@dataclass
class ParamState:
    """A parameter's state: every slot is a device array (what checkpoints save), float32
    unless the algorithm quantizes it (``Algorithm.slot_dtypes``)."""

    shape: tuple[int, ...]
    slots: dict[str, Any]
    count: int = 0  # steps applied to this name


@dataclass
class _Plan:
    """A prepared launch and what a step_batch must match to reuse it."""

    launch: Any  # the backend's PreparedLaunch
    args_row: Callable[[int, float, bool], np.ndarray]  # its ElementwiseAlgorithm's
    shapes: tuple[tuple[int, ...], ...]
    # The very param arrays (their identity is checked), referred to weakly: not kept alive.
    params: tuple[weakref.ref[np.ndarray], ...]
    states: tuple[ParamState, ...]
    scales: tuple[float, ...]  # lr_scale per item (set_lr_scale drops every plan)
    sizes: tuple[int, ...]
    uniform: bool  # one lr_scale for all items
    # Appended to by the params' weakref callbacks: once one is gone, its id may be reused,
    # so the identity check by id (launch.bind) is off.
    dead: list[bool]


def _writeable(param: Any) -> bool:
    """A NumPy array may be read-only; a CuPy array (no ``writeable`` flag) never is."""
    return bool(getattr(param.flags, "writeable", True))


def _shape(name: str, shape: Any) -> tuple[int, ...]:
    if type(shape) is tuple and all(type(d) is int and d >= 0 for d in shape):
        return shape  # already canonical (the per-step common case)
    try:
        dims = tuple(shape)
    except TypeError:
        raise TypeError(f"{name!r}: shape must be a sequence of ints, got {shape!r}") from None
    for d in dims:
        if isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 0:
            raise ValueError(f"{name!r}: shape must hold non-negative ints, got {shape!r}")
    return tuple(int(d) for d in dims)


class Optimizer:
    """One algorithm with its hyperparameters, stepping named float32 buffers in place."""

    def __init__(self, algorithm: Algorithm, backend: Any) -> None:
        self.algorithm = algorithm
        self.backend = backend
        self._lr = algorithm.hp.lr
        self._global_step = 0
        self._lr_scales: dict[str, float] = {}
        self._state: dict[str, ParamState] = {}
        # Prepared launches of recent step_batch layouts (names in order): a repeated layout
        # with the same param arrays skips the per-tensor pointer table. A plan refers to its
        # params weakly (a caller that swaps arrays leaks nothing) and is used only when the
        # caller passes those very arrays, alive.
        self._plans: dict[tuple[str, ...], _Plan] = {}

    # -- the rlx-optim Optimizer trait ---------------------------------------------------

    def step(self, name: str, shape: Sequence[int], param: Any, grad: Any) -> None:
        """Update ``param`` (contiguous float32, written in place) with ``grad`` (contiguous,
        float32 or the model's precision: bfloat16 as uint16 bits, or float16)."""
        self.step_batch([(name, shape, param, grad)])

    def step_batch(self, items: Iterable[StepArgs]) -> None:
        """Step several parameters together (the elementwise family: one fused launch for
        all of them); every item is validated before anything is written."""
        if not isinstance(items, (list, tuple)):
            items = list(items)
        found = self._plan(items)
        if found is not None:
            return self._run_plan(*found, items)
        checked = [self._check(*item) for item in items]
        names = [c[0] for c in checked]
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise ValueError(f"{dup!r} appears more than once in one step_batch")
        if not checked:
            return
        hp = self.algorithm.hp
        per_param = hp.step_count == "per_param"
        negate = negated if hp.maximize else None
        step_items = []
        for name, shape, param, grad in checked:
            state = self._state.get(name)
            if state is None:
                state = self._state[name] = self._new_state(shape)
            lr = self._lr * self._lr_scales.get(name, 1.0)
            fresh = state.count == 0
            g = grad if negate is None else negate(self.backend.xp, grad)
            t = state.count + 1 if per_param else None
            step_items.append(StepItem(name, shape, param, g, state.slots, lr, fresh, t))
        self._step_items(step_items)
        for name in names:
            self._state[name].count += 1
        if not any(it.fresh for it in step_items):
            self._prepare(step_items)

    def _step_items(self, items: list[StepItem]) -> None:
        """One algorithm step of ``items``: at the global step, or each at its own (an
        elementwise launch takes a step per tensor; others step each distinct t apart)."""
        t = self._global_step + 1
        if self.algorithm.reads_any_grad:  # fused kernels widen in registers, per item's t
            self.algorithm.step(self.backend, items, t)
            return
        for it in items:  # the others compute in float32 throughout: widened once (exact)
            it.grad = widen(self.backend.xp, it.grad)
        if items[0].t is None:
            self.algorithm.step(self.backend, items, t)
            return
        by_t: dict[int, list[StepItem]] = {}
        for it in items:
            assert it.t is not None  # set on every item of a per_param optimizer
            by_t.setdefault(it.t, []).append(it)
        for own_t, same in by_t.items():
            self.algorithm.step(self.backend, same, own_t)

    def update_hessian(self, name: str, shape: Sequence[int], hessian: Any) -> None:
        """Pass a Hessian-diagonal estimate for ``name`` (curvature-aware algorithms only).

        ``hessian`` is laid out like the parameter (contiguous float32, same size); the
        algorithm folds it into its state at the current step. Others raise ``TypeError``.
        """
        if not self.algorithm.takes_hessian:
            raise TypeError(f"{self.algorithm.name} does not take a Hessian estimate")
        name, dims, _, hess = self._check(name, shape, None, hessian, roles=("", "hessian"))
        state = self._state.get(name)
        if state is None:
            state = self._state[name] = self._new_state(dims)
        lr = self._lr * self._lr_scales.get(name, 1.0)
        item = StepItem(name, dims, None, hess, state.slots, lr, state.count == 0)
        per_param = self.algorithm.hp.step_count == "per_param"
        t = state.count + 1 if per_param else self._global_step + 1
        self.algorithm.update_hessian(self.backend, item, hess, t)

    def end_iteration(self) -> int:
        """Advance the global step counter; returns the new value."""
        self._global_step += 1
        return self._global_step

    def lr_scale(self, name: str) -> float:
        return self._lr_scales.get(name, 1.0)

    def set_lr_scale(self, name: str, scale: float) -> None:
        scale = float(scale)
        check_lr_scale(name, scale)
        check_effective_lr(self._lr, name, scale)
        self._lr_scales[name] = scale
        self._plans.clear()  # they hold per-item scales

    def check_lr(self, lr: float) -> float:
        """``lr`` as :meth:`set_lr` would take it (``ValueError`` if it would not)."""
        lr = float(lr)
        check_lr(lr)
        for name, scale in self._lr_scales.items():
            check_effective_lr(lr, name, scale)
        return lr

    def set_lr(self, lr: float) -> None:
        self._lr = self.check_lr(lr)

    def check_hyperparams(self, **changes: Any) -> Any:
        """The hyperparameters :meth:`set_hyperparams` would give (``ValueError`` or
        ``TypeError`` if it would refuse)."""
        hp = self.algorithm.hp
        if "lr" in changes:
            raise ValueError("the lr is set with set_lr (it is not a fixed hyperparameter)")
        new = type(hp).from_kwargs(**{**hp.to_dict(), **changes, "lr": hp.lr})
        algorithm = type(self.algorithm)(new)
        for name, st in self._state.items():
            if algorithm.slot_shapes(st.shape) != self.algorithm.slot_shapes(st.shape):
                raise ValueError(
                    f"changing {', '.join(sorted(changes))} changes the state {name!r} keeps "
                    "(its slots); register a new group instead"
                )
        return new

    def set_hyperparams(self, **changes: Any) -> None:
        """Change hyperparameters other than the lr between steps (a scheduler cycling the
        momentum or betas); every state buffer stays as it is. A change that would alter
        the state's layout (e.g. ``amsgrad``) is refused."""
        self.algorithm = type(self.algorithm)(self.check_hyperparams(**changes))
        self._plans.clear()  # they hold the old algorithm's scalars

    # -- inspection ----------------------------------------------------------------------

    @property
    def lr(self) -> float:
        return self._lr

    @property
    def global_step(self) -> int:
        return self._global_step

    @property
    def hyperparams(self) -> Any:
        return self.algorithm.hp

    def names(self) -> list[str]:
        return list(self._state)

    def state(self, name: str) -> ParamState:
        """The live state of ``name`` (device arrays; do not resize)."""
        try:
            return self._state[name]
        except KeyError:
            raise KeyError(f"no state for parameter {name!r}") from None

    # -- state_dict ----------------------------------------------------------------------

    def state_dict(self, copy: bool = True, live: bool = False) -> dict[str, Any]:
        """Everything a resumed run needs to continue bit-identically.

        Arrays are host copies; with ``copy=False`` host arrays are the live buffers (as
        torch's ``state_dict`` returns them), valid until the next step: for writing a
        checkpoint without doubling memory. ``live``: every backend's own arrays, device
        arrays included (a streamed checkpoint copies them to the host piece by piece).
        """
        asnumpy = getattr(self.backend.xp, "asnumpy", None)

        def to_host(a: Any) -> Any:
            if live:
                return a
            if asnumpy is not None:
                return asnumpy(a)
            return np.array(a, copy=True) if copy else a

        return {
            "algorithm": self.algorithm.name,
            "hyperparams": self.algorithm.hp.to_dict(),
            "global_step": self._global_step,
            "lr": self._lr,
            "lr_scales": dict(self._lr_scales),
            "state": {
                name: {
                    "shape": list(st.shape),
                    "count": st.count,
                    "slots": {k: to_host(v) for k, v in st.slots.items()},
                }
                for name, st in self._state.items()
            },
        }

    def load_state_dict(self, sd: Mapping[str, Any], copy: bool = True) -> None:
        """Replace all state with ``sd`` (from :meth:`state_dict`); validated first, atomic.
        ``copy=False``: C-contiguous arrays of the backend's own kind (writable, on the host)
        are kept as they are (a checkpoint read into fresh arrays, host or device, is not
        copied a second time)."""
        if sd.get("algorithm") != self.algorithm.name:
            raise ValueError(
                f"state_dict is for algorithm {sd.get('algorithm')!r}, this optimizer runs "
                f"{self.algorithm.name!r}"
            )
        algorithm = type(self.algorithm)(
            self.algorithm.hyperparams.from_kwargs(**sd.get("hyperparams", {}))
        )
        global_step = sd.get("global_step")
        if isinstance(global_step, bool) or not isinstance(global_step, int) or global_step < 0:
            raise ValueError(f"state_dict global_step must be an int >= 0, got {global_step!r}")
        lr = float(sd.get("lr", algorithm.hp.lr))
        check_lr(lr)
        lr_scales = {str(k): float(v) for k, v in sd.get("lr_scales", {}).items()}
        for name, scale in lr_scales.items():
            check_lr_scale(name, scale)
            check_effective_lr(lr, name, scale)
        xp = self.backend.xp
        states: dict[str, ParamState] = {}
        for name, entry in sd.get("state", {}).items():
            shape = _shape(name, entry["shape"])
            count = entry.get("count", 0)
            if isinstance(count, bool) or not isinstance(count, int) or count < 0:
                raise ValueError(f"{name!r}: count must be an int >= 0, got {count!r}")
            want = algorithm.slot_shapes(shape)
            dtypes = algorithm.slot_dtypes(shape)
            got = entry.get("slots", {})
            if set(got) != set(want):
                raise ValueError(f"{name!r}: slots {sorted(got)} != expected {sorted(want)}")
            slots = {}
            for slot, slot_shape in want.items():
                arr, dtype = got[slot], dtypes[slot]
                if getattr(arr, "dtype", None) != dtype or tuple(arr.shape) != slot_shape:
                    raise ValueError(
                        f"{name!r}: slot {slot!r} must be {dtype} {slot_shape}, got "
                        f"{getattr(arr, 'dtype', type(arr))} {getattr(arr, 'shape', '')}"
                    )
                keep = (
                    not copy
                    and isinstance(arr, xp.ndarray)
                    and (xp is not np or arr.flags.writeable)  # device arrays: always
                    and arr.flags.c_contiguous
                )
                slots[slot] = arr if keep else xp.array(arr, dtype=dtype, order="C", copy=True)
            states[name] = ParamState(shape, slots, count)
        self.algorithm = algorithm
        self._global_step = global_step
        self._lr = lr
        self._lr_scales = lr_scales
        self._state = states
        self._plans.clear()  # they hold the replaced slots

    # -- prepared layouts ----------------------------------------------------------------

    def drop_prepared(self) -> None:
        """Forget every prepared layout: for a caller about to unmap a param's memory (a
        layout never steps an array that is gone, but its table still holds the address)."""
        self._plans.clear()

    def _prepare(self, items: list[StepItem]) -> None:
        prepare = getattr(self.backend, "prepare", None)
        if prepare is None or not isinstance(self.algorithm, ElementwiseAlgorithm):
            return
        if not all(_writeable(it.param) for it in items):
            return
        op = self.algorithm.op()
        launch = prepare(
            op,
            [Launch(it.param, it.grad, [it.slots[s] for s in op.slots], _NO_ARGS) for it in items],
        )
        if launch is None:  # nothing worth keeping for this layout
            return
        dead: list[bool] = []

        def died(_: object) -> None:
            dead.append(True)

        scales = tuple(self._lr_scales.get(it.name, 1.0) for it in items)
        if len(self._plans) >= MAX_PLANS:
            # The oldest goes. A server steps different names of one optimizer from several
            # threads, so take the keys in one (atomic) call and tolerate a racing eviction.
            keys = list(self._plans)
            if keys:
                self._plans.pop(keys[0], None)
        self._plans[tuple(it.name for it in items)] = _Plan(
            launch,
            self.algorithm.args_row,
            tuple(it.shape for it in items),
            tuple(weakref.ref(it.param, died) for it in items),
            tuple(self._state[it.name] for it in items),
            scales,
            tuple(it.param.size for it in items),
            all(s == scales[0] for s in scales),
            dead,
        )

    def _plan(self, items: Sequence[Any]) -> tuple[_Plan, bool] | None:
        """The prepared launch for exactly these names, shapes and param arrays, if any, and
        whether it is bound: the gradients checked and in its table already."""
        if not self._plans:
            return None
        try:
            plan = self._plans.get(tuple([item[0] for item in items]))
        except (TypeError, IndexError, KeyError):  # malformed: the checked path says why
            return None
        if plan is None:
            return None
        # Every check below, and the gradients' addresses, in one C loop (not for negated
        # gradients: those are new arrays).
        bind = getattr(plan.launch, "bind", None)
        if bind and not plan.dead and not self.algorithm.hp.maximize and bind(items, plan.shapes):
            return plan, True
        for item, shape, ref in zip(items, plan.shapes, plan.params, strict=True):
            param = ref()  # None once the prepared array is gone
            if param is None or len(item) != 4 or item[2] is not param or item[1] != shape:
                return None
            if getattr(item[3], "dtype", None) != _F32:  # prepared for float32 gradients
                return None
            if not _writeable(param):
                return None
        return plan, False

    def _run_plan(self, plan: _Plan, bound: bool, items: Sequence[Any]) -> None:
        if not bound:
            for (name, shape, _, grad), size in zip(items, plan.sizes, strict=True):
                self._check_array(name, "grad", grad, shape, size)
        hp = self.algorithm.hp
        row = plan.args_row
        lr = self._lr
        scales = plan.scales
        if hp.step_count == "per_param":
            ts = [st.count + 1 for st in plan.states]
            same_t = all(t == ts[0] for t in ts)
        else:
            ts = [self._global_step + 1] * len(scales)
            same_t = True
        if plan.uniform and same_t:
            args, stride = row(ts[0], lr * scales[0], False), 0
        else:
            rows = [row(t, lr * s, False) for t, s in zip(ts, scales, strict=True)]
            args, stride = np.stack(rows), MAX_ARGS
        if bound:
            plan.launch.run_bound(args, stride)
        else:
            grads = [item[3] for item in items]
            if hp.maximize:
                grads = [negated(self.backend.xp, g) for g in grads]
            plan.launch.run(grads, args, stride)
        for st in plan.states:
            st.count += 1

    # -- internals -----------------------------------------------------------------------

    def _new_state(self, shape: tuple[int, ...]) -> ParamState:
        xp = self.backend.xp
        dtypes = self.algorithm.slot_dtypes(shape)
        slots = {
            k: xp.zeros(s, dtype=dtypes[k]) for k, s in self.algorithm.slot_shapes(shape).items()
        }
        return ParamState(shape, slots)

    def _check(
        self, name: Any, shape: Any, param: Any, grad: Any, roles: tuple = ("param", "grad")
    ) -> tuple:
        if type(name) is not str or not name:
            raise TypeError(f"parameter name must be a non-empty str, got {name!r}")
        dims = _shape(name, shape)
        size = math.prod(dims)
        for role, arr in zip(roles, (param, grad), strict=True):
            if role:
                self._check_array(name, role, arr, dims, size)
        if roles[0] and isinstance(param, np.ndarray) and not param.flags.writeable:
            raise ValueError(f"{name!r}: param must be writable (it is updated in place)")
        state = self._state.get(name)
        if state is not None and state.shape != dims:
            raise ValueError(f"{name!r}: shape {dims} differs from its registered {state.shape}")
        return name, dims, param, grad

    def _check_array(self, name: str, role: str, arr: Any, dims: tuple, size: int) -> None:
        array_type = self.backend.xp.ndarray
        if (
            isinstance(arr, array_type)
            and arr.dtype == _F32
            and arr.flags.c_contiguous
            and arr.size == size
        ):
            return  # the common case, kept to one condition: this runs per tensor per step
        if not isinstance(arr, array_type):
            raise TypeError(
                f"{name!r}: {role} must be a {array_type.__module__}.ndarray, got "
                f"{type(arr).__name__}"
            )
        if role == "grad" and arr.dtype in GRAD_DTYPES:
            pass  # a gradient in the model's precision (uint16: bfloat16 bits)
        elif role == "grad":
            raise TypeError(
                f"{name!r}: grad must be float32, bfloat16 (as uint16 bits) or float16, got "
                f"{arr.dtype}"
            )
        elif arr.dtype != _F32:
            raise TypeError(f"{name!r}: {role} must be float32, got {arr.dtype}")
        if not arr.flags.c_contiguous:
            raise ValueError(f"{name!r}: {role} must be C-contiguous (no silent copies)")
        if arr.size != size:
            raise ValueError(f"{name!r}: {role} has {arr.size} elements, shape {dims} needs {size}")


def create_optimizer(algorithm: str, *, backend: str = "auto", **hparams: Any) -> Optimizer:
    """``create_optimizer("adamw", lr=1e-3, weight_decay=0.01)``; names as in torch.optim.

    ``backend``: ``auto`` (fused CPU, NumPy fallback with a warning), ``cpu``, ``cuda``
    (CuPy arrays) or ``reference`` (NumPy).
    """
    try:
        cls = ALGORITHMS[algorithm]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown algorithm {algorithm!r}; expected one of {', '.join(sorted(ALGORITHMS))}"
        ) from None
    return Optimizer(cls(cls.hyperparams.from_kwargs(**hparams)), get_backend(backend))
