"""Frozen, validated hyperparameter dataclasses shared by every algorithm.

Values are coerced by annotation (``int`` → ``float``, a list of betas → a tuple) and then
checked by the subclass's ``validate``; messages follow torch.optim's wording, e.g.
``Invalid beta parameter at index 0: 1.2``.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import typing
from typing import Any, ClassVar

# The largest finite float32: the kernels compute in float32, so a finite hyperparameter
# beyond it would turn a parameter into Inf or NaN on its first step.
FLOAT32_MAX = 3.4028234663852886e38
STEP_COUNTS = ("global", "per_param")
SHARED = ("maximize", "step_count")  # every algorithm's options beyond its own (see below)


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if math.isfinite(value) and abs(value) > FLOAT32_MAX:  # Inf and NaN: each field's rule
        raise ValueError(f"{name} {value} is beyond float32's range (±{FLOAT32_MAX:.8g})")
    return value


def _coerce(name: str, hint: Any, value: Any) -> Any:
    if hint is float:
        return _number(name, value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{name} must be an integer, got {value!r}")
        return int(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool, got {value!r}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise TypeError(f"{name} must be a str, got {value!r}")
        return value
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is tuple:
        if isinstance(value, (str, bytes)) or not isinstance(value, typing.Sequence):
            raise TypeError(f"{name} must be a sequence of {len(args)} numbers, got {value!r}")
        if len(value) != len(args):
            raise ValueError(f"{name} must have {len(args)} entries, got {len(value)}")
        return tuple(_number(f"{name}[{i}]", v) for i, v in enumerate(value))
    if type(None) in args:  # `X | None`
        inner = next(a for a in args if a is not type(None))
        return None if value is None else _coerce(name, inner, value)
    raise AssertionError(f"unsupported hyperparameter type {hint!r} for {name}")


@dataclasses.dataclass(frozen=True)
class Hyperparams:
    """Base of every algorithm's hyperparameters; subclasses add fields and ``validate``."""

    algorithm: ClassVar[str] = ""
    # Every algorithm has a base learning rate (the optimizer's ``lr``, which ``set_lr``
    # changes). Each subclass declares it again, as its first field, with its own default.
    lr: float
    # torch.optim's ``maximize``: ascend the objective (each gradient is negated first, which
    # is exactly what torch does, weight decay included).
    maximize: bool = False
    # Which step t a parameter's bias corrections and schedules see: "global" (the run's
    # iteration count, advanced by end_iteration: rlx-optim's contract) or "per_param" (the
    # steps this parameter has taken, as torch.optim counts: a parameter without a gradient
    # in an iteration does not advance, one added later starts at 1).
    step_count: str = "global"

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, _coerce(f.name, hints[f.name], getattr(self, f.name)))
        if self.step_count not in STEP_COUNTS:
            raise ValueError(
                f"Invalid step_count value: {self.step_count!r} (one of {', '.join(STEP_COUNTS)})"
            )
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` for an out-of-range value."""

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The algorithm's own fields, then the options every algorithm shares."""
        own = tuple(f.name for f in dataclasses.fields(cls) if f.name not in SHARED)
        return own + SHARED

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> typing.Self:
        unknown = sorted(set(kwargs) - set(cls.names()))
        if unknown:
            raise TypeError(
                f"{cls.algorithm} got unknown hyperparameter(s) {', '.join(map(repr, unknown))}; "
                f"valid: {', '.join(cls.names())}"
            )
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: tuples become lists."""
        out = {}
        for k in self.names():
            v = getattr(self, k)
            out[k] = list(v) if isinstance(v, tuple) else v
        return out

    def replace(self, **changes: Any) -> typing.Self:
        return dataclasses.replace(self, **changes)


def check_lr(lr: float) -> None:
    if not (math.isfinite(lr) and lr >= 0.0):
        raise ValueError(f"Invalid learning rate: {lr}")
    if lr > FLOAT32_MAX:
        raise ValueError(f"Invalid learning rate: {lr} (beyond float32's {FLOAT32_MAX:.8g})")


def check_eps(eps: float) -> None:
    if not (math.isfinite(eps) and eps >= 0.0):
        raise ValueError(f"Invalid epsilon value: {eps}")


def check_betas(betas: tuple[float, ...]) -> None:
    for i, beta in enumerate(betas):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"Invalid beta parameter at index {i}: {beta}")


def check_weight_decay(weight_decay: float) -> None:
    if not (math.isfinite(weight_decay) and weight_decay >= 0.0):
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")


def check_unit_interval(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"Invalid {name} value: {value}")


def check_lr_scale(name: str, scale: float) -> None:
    if not (math.isfinite(scale) and scale >= 0.0):
        raise ValueError(f"Invalid lr_scale for {name!r}: {scale} (must be finite and >= 0)")
    if scale > FLOAT32_MAX:
        raise ValueError(
            f"Invalid lr_scale for {name!r}: {scale} (beyond float32's {FLOAT32_MAX:.8g})"
        )


def check_effective_lr(lr: float, name: str, scale: float) -> None:
    """lr × lr_scale is what the kernel gets, in float32."""
    if lr * scale > FLOAT32_MAX:
        raise ValueError(
            f"lr {lr} × lr_scale {scale} for {name!r} is beyond float32's {FLOAT32_MAX:.8g}"
        )
