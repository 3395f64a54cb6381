"""``RemoteOptimizer``: a ``torch.optim.Optimizer`` whose step runs on stepd.

::

    opt = RemoteOptimizer(model.named_parameters(), "http://127.0.0.1:8000", algorithm="adamw",
                          lr=1e-3, weight_decay=0.01)     # was: torch.optim.AdamW(...)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.5)

One param group (the server's group: one algorithm, one set of hyperparameters). Every
parameter is registered at construction, so where the server already holds a name its value
is copied into the model (the server's copy wins). ``step()`` sends every ``.grad`` in one
``step_batch`` round trip, writes the results into ``p.data`` and ends the iteration; when a
scheduler (or the user) changed ``param_groups[0]['lr']``, ``set_lr`` is sent first.
Parameters without a gradient are skipped, as in torch. float32 parameters only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

import numpy as np
import torch

from .optimizer import StepdOptimizer, connect


class RemoteOptimizer(torch.optim.Optimizer):
    """``torch.optim.Optimizer`` over a :class:`stepd.client.StepdOptimizer` (any transport)."""

    def __init__(
        self,
        named_parameters: Iterable[tuple[str, torch.Tensor]],
        url: str,
        algorithm: str = "adamw",
        *,
        run: str | None = None,
        fresh: bool = False,
        token: str | None = None,
        timeout: float = 30.0,
        **hyperparams: Any,
    ) -> None:
        """``run``: a named run to join (see :func:`stepd.client.connect`); without it, an
        anonymous run private to this optimizer."""
        named = list(named_parameters)
        if not named:
            raise ValueError("RemoteOptimizer got an empty parameter list")
        names = [n for n, _ in named]
        if len(set(names)) != len(names):
            raise ValueError("parameter names must be unique")
        for n, p in named:
            if not isinstance(p, torch.Tensor) or p.dtype != torch.float32:
                raise TypeError(f"{n!r}: RemoteOptimizer takes float32 tensors only")
        self.remote: StepdOptimizer = connect(
            url, algorithm, run=run, fresh=fresh, token=token, timeout=timeout, **hyperparams
        )
        try:
            for n, p in named:
                self._sync(p, partial(self.remote.register, n, tuple(p.shape)))
            lr = self.remote.lr
        except BaseException:
            self.remote.close()
            raise
        self._names = {p: n for n, p in named}
        self._sent_lr = lr
        super().__init__([p for _, p in named], {"lr": lr})

    @staticmethod
    def _sync(p: torch.Tensor, call: Callable[[np.ndarray], None]) -> None:
        """Run ``call`` on a numpy buffer of ``p``: ``p.data`` itself when it is a contiguous
        CPU tensor (written in place), else a copy that is written back afterwards."""
        data = p.data
        if data.device.type == "cpu" and data.is_contiguous():
            call(data.numpy())
            return
        buf = data.detach().to("cpu", copy=True).contiguous().numpy()
        call(buf)
        data.copy_(torch.from_numpy(buf))

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if len(self.param_groups) != 1:
            raise ValueError("RemoteOptimizer supports exactly one param group")
        group = self.param_groups[0]
        lr = float(group["lr"])
        if lr != self._sent_lr:
            self.remote.set_lr(lr)
            self._sent_lr = lr
        items, writebacks = [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            grad = p.grad.detach().to("cpu", torch.float32).contiguous().numpy()
            data = p.data
            if data.device.type == "cpu" and data.is_contiguous():
                buf = data.numpy()
            else:
                buf = data.detach().to("cpu", copy=True).contiguous().numpy()
                writebacks.append((data, buf))
            items.append((self._names[p], tuple(p.shape), buf, grad))
        if items:
            self.remote.step_batch(items)
        for data, buf in writebacks:
            data.copy_(torch.from_numpy(buf))
        self.remote.end_iteration()
        return loss

    def state_dict(self) -> dict[str, Any]:
        """torch's structure plus ``"stepd"``: the remote optimizer's own state_dict."""
        sd = super().state_dict()
        sd["stepd"] = self.remote.state_dict()
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the param groups and, when present, the remote state (any transport)."""
        state_dict = dict(state_dict)
        remote = state_dict.pop("stepd", None)
        if remote is not None:
            self.remote.load_state_dict(remote)
        super().load_state_dict(state_dict)
        self._sent_lr = None  # resend the group's lr on the next step

    def close(self) -> None:
        self.remote.close()
