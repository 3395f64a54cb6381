"""``load_state_dict`` over a server: the checked state dict and its uploads.

A state dict (the structure of ``kernels.Optimizer.state_dict()``) is checked here for its
structure (``TypeError`` / ``ValueError``, before anything is sent); the server checks what
only it knows (slot shapes of the algorithm, the group's hyperparameters, registration).
It travels as safetensors: tensors ``{param}/{slot}``, and ``__metadata__`` whose values are
JSON: ``algorithm``, ``hyperparams``, ``counts`` ``{param: count}``, ``shapes``
``{param: shape}``, and optionally ``lr``,
``lr_scales``, ``global_step`` and ``replace`` (see ``PUT /v1/groups/{id}/state``).

Only names this client has registered can be uploaded (the group id is known after the first
registration, and the server accepts state for its registered parameters only), so a
:class:`StateLoad` keeps the rest *pending*: each pending name's state is uploaded right
after the name registers, before its first step. The first upload of a load replaces the
group's whole state and sets the global step (server-wide); later ones add their names.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from stepd import wire

_F32 = np.dtype(np.float32)
_U8 = np.dtype(np.uint8)


def _number(what: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"state_dict {what} must be a number, got {value!r}")
    value = float(value)
    if not (math.isfinite(value) and value >= 0.0):
        raise ValueError(f"state_dict {what} must be finite and >= 0, got {value}")
    return value


def _count(what: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"state_dict {what} must be an int, got {value!r}")
    if value < 0:
        raise ValueError(f"state_dict {what} must be >= 0, got {value}")
    return int(value)


def check(state: Mapping[str, Any], algorithm: str) -> dict[str, Any]:
    """A validated copy of ``state`` (arrays copied, so later edits by the caller are moot)."""
    if state.get("algorithm") != algorithm:
        raise ValueError(
            f"state_dict is for algorithm {state.get('algorithm')!r}, this optimizer runs "
            f"{algorithm!r}"
        )
    hyperparams = state.get("hyperparams", {})
    if not isinstance(hyperparams, Mapping):
        raise TypeError(f"state_dict hyperparams must be a mapping, got {hyperparams!r}")
    try:
        hyperparams = json.loads(json.dumps(dict(hyperparams), allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise TypeError(f"state_dict hyperparams must be plain JSON values: {exc}") from None
    lr = state.get("lr")
    scales = state.get("lr_scales", {})
    if not isinstance(scales, Mapping):
        raise TypeError(f"state_dict lr_scales must be a mapping, got {type(scales).__name__}")
    entries = state.get("state", {})
    if not isinstance(entries, Mapping):
        raise TypeError(f"state_dict state must be a mapping, got {type(entries).__name__}")
    out: dict[str, Any] = {
        "algorithm": algorithm,
        "hyperparams": hyperparams,
        "global_step": _count("global_step", state.get("global_step")),
        "lr": None if lr is None else _number("lr", lr),
        "lr_scales": {_param(n): _number(f"lr_scale of {n!r}", s) for n, s in scales.items()},
        "state": {},
    }
    for name, entry in entries.items():
        name = _param(name)
        if not isinstance(entry, Mapping):
            raise TypeError(f"state_dict state[{name!r}] must be a mapping")
        dims = entry.get("shape")
        if dims is None:
            raise TypeError(f"{name!r}: shape must be a sequence of ints")
        try:
            shape = [_count(f"{name!r} shape entry", d) for d in dims]
        except TypeError:
            raise TypeError(f"{name!r}: shape must be a sequence of ints") from None
        slots = entry.get("slots", {})
        if not isinstance(slots, Mapping):
            raise TypeError(f"{name!r}: slots must be a mapping of slot name to array")
        checked = {}
        for slot, arr in slots.items():
            if type(slot) is not str or not slot:
                raise TypeError(f"{name!r}: slot names must be non-empty str, got {slot!r}")
            # float32, or uint8: 8-bit state's codes (the algorithm says which slot is which)
            if not isinstance(arr, np.ndarray) or arr.dtype not in (_F32, _U8):
                raise TypeError(
                    f"{name!r}: slot {slot!r} must be a float32 (or uint8 codes) numpy.ndarray, "
                    f"got {getattr(arr, 'dtype', type(arr).__name__)}"
                )
            checked[slot] = np.array(arr, order="C", copy=True)
        count = _count(f"{name!r} count", entry.get("count", 0))
        out["state"][name] = {"shape": shape, "count": count, "slots": checked}
    return out


def _param(name: Any) -> str:
    if type(name) is not str or not name:
        raise TypeError(f"parameter name must be a non-empty str, got {name!r}")
    if "/" in name:
        raise ValueError(f"parameter name {name!r} cannot hold '/' (servers refuse it)")
    return name


class StateLoad:
    """A checked state dict being uploaded, name by name as names register."""

    def __init__(self, state: Mapping[str, Any], algorithm: str) -> None:
        self.sd = check(state, algorithm)
        self.pending = set(self.sd["state"])  # names whose state is not uploaded yet
        self.first = True  # the next upload replaces the group's state and sets global_step

    @property
    def global_step(self) -> int:
        return self.sd["global_step"]

    @property
    def lr(self) -> float | None:
        return self.sd["lr"]

    @property
    def lr_scales(self) -> dict[str, float]:
        return self.sd["lr_scales"]

    @property
    def finished(self) -> bool:
        return not self.first and not self.pending

    def advance(self) -> int:
        """``end_iteration`` before the first upload: the step to set moves on too."""
        self.sd["global_step"] += 1
        return self.sd["global_step"]

    def next_upload(
        self, registered: Iterable[str], lr_scales: Mapping[str, float] | None = None
    ) -> tuple[bytes, list[str]] | None:
        """The body of the upload due now (``None``: none) and the names it carries."""
        names = [n for n in registered if n in self.pending]
        if not names and not self.first and not lr_scales:
            return None
        tensors = {}
        for name in names:
            for slot, arr in self.sd["state"][name]["slots"].items():
                tensors[f"{name}/{slot}"] = arr
        meta: dict[str, Any] = {
            "algorithm": self.sd["algorithm"],
            "hyperparams": self.sd["hyperparams"],
            "counts": {n: self.sd["state"][n]["count"] for n in names},
            "shapes": {n: self.sd["state"][n]["shape"] for n in names},
            "replace": self.first,
        }
        if self.first:
            meta["global_step"] = self.global_step
            if self.lr is not None:
                meta["lr"] = self.lr
        if lr_scales:
            meta["lr_scales"] = dict(lr_scales)
        body = wire.dump(tensors, {k: json.dumps(v) for k, v in meta.items()})
        return body, names

    def uploaded(self, names: Iterable[str]) -> None:
        self.first = False
        self.pending.difference_update(names)

    def overlay(self, sd: dict[str, Any], pending_scales: Mapping[str, float]) -> dict[str, Any]:
        """``sd`` (the server's view) as it will be once every pending upload is done;
        ``pending_scales``: the lr_scales of names not registered yet."""
        sd["lr_scales"] = {**sd["lr_scales"], **pending_scales}
        if self.first:  # nothing uploaded yet (the server checks hyperparams at the upload)
            sd["global_step"] = self.global_step
            sd["hyperparams"] = json.loads(json.dumps(self.sd["hyperparams"]))
            if self.lr is not None:
                sd["lr"] = self.lr
        for name in sorted(self.pending):
            entry = self.sd["state"][name]
            sd["state"][name] = {
                "shape": list(entry["shape"]),
                "count": entry["count"],
                "slots": {k: v.copy() for k, v in entry["slots"].items()},
            }
        return sd
