"""Groups: an optimizer configuration (algorithm, hyperparameters, workers mode) and its id.

Parameters registered with the same configuration share one ``stepd.kernels.Optimizer``;
the id is a hash of the canonical configuration, so it is the same in every process.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from stepd.kernels import Optimizer, create_optimizer
from stepd.kernels.algorithms import ALGORITHMS

from stepd.wire import PARAM_NAME_RE, PARAM_NAME_RULE

from .errors import Invalid
from .workers import parse_workers


def check_name(name: str) -> str:
    if not isinstance(name, str) or not PARAM_NAME_RE.fullmatch(name):
        raise Invalid(f"invalid parameter name {name!r}: {PARAM_NAME_RULE}")
    return name


# Hyperparameters every algorithm (or Adam's family) gained later, at their defaults.
LATER_DEFAULTS: dict[str, Any] = {"maximize": False, "step_count": "global", "amsgrad": False}
_NONE = object()


@dataclass(frozen=True)
class Group:
    """An optimizer configuration; its id is stable across processes (a hash of the config)."""

    algorithm: str
    hyperparams: Mapping[str, Any]
    workers: Mapping[str, Any] = field(default_factory=lambda: {"mode": "plain"})
    id: str = field(init=False, compare=False)
    # a step's cost is proportional to its elements (see Algorithm.linear_cost)
    linear_cost: bool = field(init=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "linear_cost", ALGORITHMS[self.algorithm].linear_cost)
        # Options added since ids were first given leave them unchanged at their defaults,
        # so a checkpoint's groups are still found by the ids it names.
        hyperparams = {
            k: v for k, v in self.hyperparams.items() if LATER_DEFAULTS.get(k, _NONE) != v
        }
        config: dict[str, Any] = {"a": self.algorithm, "h": hyperparams}
        if self.workers["mode"] != "plain":  # plain groups keep the ids they always had
            config["w"] = self.workers
        canon = json.dumps(config, sort_keys=True)
        digest = hashlib.sha256(canon.encode()).hexdigest()[:10]
        object.__setattr__(self, "id", f"{self.algorithm}-{digest}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "algorithm": self.algorithm,
            "hyperparams": dict(self.hyperparams),
            "workers": dict(self.workers),
        }


def resolve_group(
    algorithm: str, hyperparams: Mapping[str, Any], workers: Mapping[str, Any] | None = None
) -> tuple[Group, Optimizer]:
    """Validate a group config through the algorithm's dataclass and the workers rules."""
    try:
        opt = create_optimizer(algorithm, backend="reference", **dict(hyperparams))
        return Group(algorithm, opt.hyperparams.to_dict(), parse_workers(workers)), opt
    except (TypeError, ValueError, OverflowError) as exc:  # Overflow: an int past float
        raise Invalid(str(exc)) from None


def check_group(spec: Mapping[str, Any]) -> Group:
    """A group spec as clients send it (``algorithm``, ``hyperparams``, ``workers``)."""
    algorithm, hyperparams = spec.get("algorithm"), spec.get("hyperparams", {})
    workers = spec.get("workers")
    if not isinstance(algorithm, str):
        raise Invalid(f"the group's algorithm must be a string, got {algorithm!r}")
    if not isinstance(hyperparams, Mapping):
        raise Invalid(f"the group's hyperparams must be an object, got {hyperparams!r}")
    if workers is not None and not isinstance(workers, Mapping):
        raise Invalid(f"the group's workers must be an object, got {workers!r}")
    group, _ = resolve_group(algorithm, hyperparams, workers)
    return group


def committed_bytes(reference: Optimizer, shape: tuple[int, ...]) -> int:
    """The bytes a parameter of ``shape`` commits: itself (float32) and every state slot its
    algorithm will allocate (factors, eigenbases and preconditioners included), each in its
    dtype (float32; 8-bit state's codes one byte)."""
    algorithm = reference.algorithm
    slots, dtypes = algorithm.slot_shapes(shape), algorithm.slot_dtypes(shape)
    state = sum(math.prod(s) * dtypes[k].itemsize for k, s in slots.items())
    return 4 * math.prod(shape) + state
