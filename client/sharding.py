"""Parameters sharded over several servers: ``connect([url0, url1, ...], ...)``.

The owner of a parameter is a stable hash of its name (:func:`stepd.wire.shard_of`, the
server's own; never Python's salted ``hash``), so every process and every run agree. Each
server is told which shard the client thinks it is and refuses a mismatch, so a client with
a wrong server list fails loudly instead of scattering state. ``step_batch`` sends one
request per server; ``end_iteration``, ``set_lr`` and ``state_dict`` fan out. Each server
holds its part of the run under the same name (an anonymous run has one name per server).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from stepd.wire import shard_of

from .optimizer import StepArgs, StepdOptimizer


class ShardedOptimizer:
    """The Optimizer contract over one :class:`StepdOptimizer` per server."""

    def __init__(self, shards: Sequence[StepdOptimizer]) -> None:
        if not shards:
            raise ValueError("a sharded optimizer needs at least one server")
        self.shards = list(shards)

    def _owner(self, name: str) -> StepdOptimizer:
        if type(name) is not str or not name:
            raise TypeError(f"parameter name must be a non-empty str, got {name!r}")
        return self.shards[shard_of(name, len(self.shards))]

    def step(self, name: str, shape: Sequence[int], param: np.ndarray, grad: np.ndarray) -> None:
        self._owner(name).step(name, shape, param, grad)

    def step_batch(self, items: Iterable[StepArgs], last: bool = False) -> None:
        by_shard: dict[int, list[StepArgs]] = {}
        for item in items:
            self._owner(item[0])  # validates the name
            by_shard.setdefault(shard_of(item[0], len(self.shards)), []).append(item)
        for index, group in sorted(by_shard.items()):
            self.shards[index].step_batch(group, last)

    def register(self, name: str, shape: Sequence[int], param: np.ndarray) -> None:
        """Register ``name`` on its server now (the server's copy wins, in place)."""
        self._owner(name).register(name, shape, param)

    def pull(self, name: str) -> None:
        """The current value of ``name`` from its server, into its param (see
        :meth:`StepdOptimizer.pull`)."""
        self._owner(name).pull(name)

    def join(self) -> list[dict[str, Any]]:
        """Join every server's sync membership (see :meth:`StepdOptimizer.join`)."""
        return [opt.join() for opt in self.shards]

    def leave(self) -> list[dict[str, Any]]:
        return [opt.leave() for opt in self.shards]

    def heartbeat(self) -> list[dict[str, Any]]:
        return [opt.heartbeat() for opt in self.shards]

    @property
    def dropped(self) -> tuple[str, ...]:
        """The sync workers any server dropped from the last iteration ended."""
        return tuple(sorted({w for opt in self.shards for w in opt.dropped}))

    def pull_all(self) -> None:
        """Every registered name's current value, one round trip per server."""
        for opt in self.shards:
            opt.pull_all()

    @property
    def stale_gradients(self) -> int:
        """Gradients refused as stale, over every server."""
        return sum(opt.stale_gradients for opt in self.shards)

    @property
    def lr(self) -> float | None:
        """The learning rate now in force (every shard is set alike)."""
        return self.shards[0].lr

    def end_iteration(self) -> int:
        steps = {opt.end_iteration() for opt in self.shards}
        if len(steps) != 1:
            raise RuntimeError(f"the shards disagree on the global step: {sorted(steps)}")
        return steps.pop()

    def lr_scale(self, name: str) -> float:
        return self._owner(name).lr_scale(name)

    def update_hessian(self, name: str, shape: Sequence[int], hessian: np.ndarray) -> None:
        self._owner(name).update_hessian(name, shape, hessian)

    def set_lr_scale(self, name: str, scale: float) -> None:
        self._owner(name).set_lr_scale(name, scale)

    def set_lr(self, lr: float) -> None:
        for opt in self.shards:
            opt.set_lr(lr)

    def set_value(self, name: str, shape: Sequence[int], value: np.ndarray) -> None:
        self._owner(name).set_value(name, shape, value)

    def set_hyperparams(self, **changes: Any) -> dict[str, Any]:
        now: dict[str, Any] = {}
        for opt in self.shards:
            now = opt.set_hyperparams(**changes)
        return now

    def state_dict(self) -> dict[str, Any]:
        """The shards' state merged into one (as a single server's would be)."""
        parts = [opt.state_dict() for opt in self.shards]
        merged = dict(parts[0])
        merged["state"] = {k: v for p in parts for k, v in p["state"].items()}
        merged["lr_scales"] = {k: v for p in parts for k, v in p["lr_scales"].items()}
        return merged

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for index, opt in enumerate(self.shards):
            mine = {
                k: v for k, v in state["state"].items() if shard_of(k, len(self.shards)) == index
            }
            scales = {
                k: v
                for k, v in state.get("lr_scales", {}).items()
                if shard_of(k, len(self.shards)) == index
            }
            opt.load_state_dict({**state, "state": mine, "lr_scales": scales})

    def close(self) -> None:
        for opt in self.shards:
            opt.close()

    def __enter__(self) -> ShardedOptimizer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
