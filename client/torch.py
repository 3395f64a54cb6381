"""``RemoteOptimizer``: a ``torch.optim.Optimizer`` whose step runs on stepd.

::

    opt = RemoteOptimizer(model.parameters(), "http://127.0.0.1:8000", algorithm="adamw",
                          lr=1e-3, weight_decay=0.01)     # was: torch.optim.AdamW(...)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.5)

It takes what ``torch.optim`` takes: ``model.parameters()``, ``model.named_parameters()``
or a list of param-group dicts with per-group options (``[{"params": decay}, {"params":
no_decay, "weight_decay": 0.0}]``), and ``add_param_group``. Each torch param group is one
server group (one algorithm, one set of hyperparameters, its own lr), over its own
connection: an anonymous run per group, or the named ``run=`` they all join. Parameters are
named as ``named_parameters()`` names them, else ``g{group}.p{position}`` (``g0.p3``: stable
as long as the parameter order is, like torch's integer ids). Trainable parameters are
registered at construction, so where the server already holds a name its value is copied
into the model (the server's copy wins); frozen ones (``requires_grad=False``) are not
registered nor sent, until they are stepped.

``step()`` sends every ``.grad`` of a group in one ``step_batch`` round trip, writes the
results into ``p.data`` and ends the iteration; a parameter whose ``.grad`` is ``None`` is
not stepped. An lr set in ``param_groups`` (by a scheduler or by hand) is sent at once, so
the server's lr is the group's lr whenever a step or a checkpoint reads it.

Mixed precision: a bfloat16 or float16 model is served the way mixed-precision training
does it — the server keeps float32 master weights and float32 state, the gradients travel
in the model's precision (half the bytes) and the parameters come back rounded to it (to
nearest even). A float64 model is stepped in float32 on the server.
"""

from __future__ import annotations

import contextlib
import copy
import json
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeAlias

import numpy as np
import torch

from stepd.wire import PARAM_NAME_RE, PARAM_NAME_RULE

from .optimizer import connect

ParamsT: TypeAlias = (
    Iterable[torch.Tensor] | Iterable[tuple[str, torch.Tensor]] | Iterable[dict[str, Any]]
)
StepItem: TypeAlias = tuple[str, tuple[int, ...], np.ndarray, np.ndarray]

#: torch.optim arguments accepted and ignored: they choose how torch computes the same step
#: (multi-tensor loops, fused kernels, CUDA graphs, autograd through the step), none of which
#: applies to a step that runs on the server.
IGNORED = {"foreach": None, "fused": None, "capturable": False, "differentiable": False}
#: torch.optim arguments that are server hyperparameters where the algorithm has them, and
#: otherwise refused when True (``False`` is accepted).
REFUSED = ("amsgrad", "maximize")
#: Where torch.optim's defaults differ from stepd's for the same update: the adapter takes
#: torch's, so ``RemoteOptimizer(params, url, "nadamw")`` is ``torch.optim.NAdam(params)``.
TORCH_DEFAULTS: dict[str, dict[str, Any]] = {
    "nadamw": {"lr": 2e-3, "weight_decay": 0.0, "momentum_decay": 4e-3},
}
#: torch's ``decoupled_weight_decay`` per algorithm: its default, and the values taken.
_DECOUPLED: dict[str, tuple[bool, tuple[bool, ...]]] = {
    "adam": (False, (False,)),
    "adamw": (True, (True,)),
    "nadamw": (False, (False, True)),
}
#: state entries torch keeps that stepd derives from the step count
_DERIVED = ("step", "mu_product")


# What a model's parameters may be. bfloat16 and float16 travel as they are (the server keeps
# float32 master weights and state, and sends the parameters back rounded to the model's
# precision); float64 is stepped in float32 on the server.
_PRECISIONS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _numpy(t: torch.Tensor) -> tuple[np.ndarray, bool]:
    """``t`` as the client takes it: float32, bfloat16 (as its uint16 bits) or float16 — a
    view of ``t`` itself where it is a contiguous CPU tensor of those (True), else a copy
    (float64 and others as float32)."""
    if t.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return t.detach().to("cpu", torch.float32, copy=True).contiguous().numpy(), False
    shared = t.device.type == "cpu" and t.is_contiguous()
    if not shared:
        t = t.detach().to("cpu", copy=True).contiguous()
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: its bits, as stepd carries them
        return t.view(torch.int16).numpy().view(np.uint16), shared
    return t.numpy(), shared


def _write_back(t: torch.Tensor, arr: np.ndarray) -> None:
    """Copy what :func:`_numpy` gave (and the client updated) back into ``t``."""
    if arr.dtype == np.uint16:
        t.copy_(torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16))
    else:
        t.copy_(torch.from_numpy(arr))


def _plain(value: Any) -> Any:
    """A hyperparameter as JSON would carry it (0-dim tensors become numbers)."""
    if isinstance(value, torch.Tensor):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _canon(value: Any) -> Any:
    """For comparing hyperparameters: numbers as floats, sequences as tuples."""
    value = _plain(value)
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, list):
        return tuple(_canon(v) for v in value)
    return value


def _torch_value(value: Any) -> Any:
    """A resolved hyperparameter as torch.optim shows it (betas as a tuple)."""
    return tuple(value) if isinstance(value, list) else value


class _ParamGroup(dict[str, Any]):
    """A torch param group that tells its optimizer when an option changes, so the server
    hears of an lr change at once and a change it cannot apply fails where it is made."""

    _owner: RemoteOptimizer | None = None
    _link: _Link | None = None
    _names: list[str]

    def __setitem__(self, key: str, value: Any) -> None:
        if self._owner is not None and self._link is not None:
            self._owner._on_set(self, key, value)
        super().__setitem__(key, value)

    @property
    def link(self) -> _Link:
        assert self._link is not None, "a group of a RemoteOptimizer has its server group"
        return self._link

    def __deepcopy__(self, memo: dict[int, Any]) -> dict[str, Any]:
        return copy.deepcopy(dict(self), memo)

    def __reduce__(self) -> tuple[Any, ...]:
        return (dict, (dict(self),))


@dataclass(eq=False)
class _Link:
    """One server group and the torch param groups stepped in it."""

    remote: Any  # StepdOptimizer, or ShardedOptimizer over several servers
    hyperparams: dict[str, Any]  # as the server group was created (resolved)
    lr: float  # the lr in force on the server
    l2: bool  # weight decay added to the gradient here (torch's NAdam without decoupling)
    decoupled: bool | None  # torch's decoupled_weight_decay (None: not a torch option)
    groups: list[_ParamGroup] = field(default_factory=list)
    registered: set[str] = field(default_factory=set)  # names the server group has
    # Parameters whose data and gradient live in the shared memory the server steps in
    # place (shm:// with a float32 CPU model): nothing is copied on a step.
    shared: dict[torch.Tensor, _Shared] = field(default_factory=dict)

    def register(self, name: str, p: torch.Tensor) -> None:
        if name in self.registered:
            return
        if self._zero_copy(p):
            param, grad = self.remote.buffers(name, tuple(p.shape), p.detach().numpy())
            old_grad = p.grad
            p.data = torch.from_numpy(param)  # the server's copy, if it had one, is here
            g = torch.from_numpy(grad)
            g.copy_(old_grad if old_grad is not None else torch.zeros_like(g))
            p.grad = g
            self.shared[p] = _Shared(param, grad, g)
        else:
            RemoteOptimizer._sync(p, partial(self.remote.register, name, tuple(p.shape)))
        self.registered.add(name)

    def _zero_copy(self, p: torch.Tensor) -> bool:
        transport = getattr(self.remote, "transport", None)
        return (
            hasattr(transport, "buffers")
            and p.dtype == torch.float32
            and p.device.type == "cpu"
            and p.is_contiguous()
        )


@dataclass(eq=False)
class _Shared:
    """A parameter's arrays in a shm:// segment, and the gradient tensor over them."""

    param: np.ndarray
    grad: np.ndarray
    grad_tensor: torch.Tensor

    def arrays(self, p: torch.Tensor) -> tuple[np.ndarray, np.ndarray] | None:
        """The segment's very arrays when ``p`` still uses them (the shm transport then
        copies nothing), else None: the caller replaced ``p.data`` or ``p.grad``."""
        grad = p.grad
        if (
            grad is None
            or grad.data_ptr() != self.grad.ctypes.data
            or p.data.data_ptr() != self.param.ctypes.data
        ):
            return None
        return self.param, self.grad


class _Overlap:
    """Steps sent from backward (``overlap=True``): each gradient joins its server group's
    bucket as autograd finishes it, and one thread sends a full bucket (one ``step_batch``)
    while backward goes on; ``step()`` sends what is left and waits for the replies."""

    def __init__(self, bucket_bytes: int) -> None:
        self.bucket_bytes = bucket_bytes
        self.paused = 0  # inside no_sync()
        # The gradients sent this iteration with their version counters: a gradient changed
        # after it was sent (clipped, unscaled) is not the one its step used.
        self.sent: dict[torch.Tensor, tuple[torch.Tensor, int]] = {}
        self.buckets: dict[_Link, tuple[list[StepItem], int]] = {}
        self.writebacks: list[tuple[torch.Tensor, np.ndarray]] = []
        self.hooks: list[Any] = []
        self._futures: list[Future[None]] = []
        self._pool: ThreadPoolExecutor | None = None
        self._failed = False

    def add(self, link: _Link, item: StepItem) -> None:
        items, size = self.buckets.pop(link, ([], 0))
        items.append(item)
        size += item[3].nbytes
        if size >= self.bucket_bytes:
            self._send(link, items)
        else:
            self.buckets[link] = (items, size)

    def _send(self, link: _Link, items: list[StepItem]) -> None:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="stepd-overlap")
        self._futures.append(self._pool.submit(self._step, link, items))

    def _step(self, link: _Link, items: list[StepItem]) -> None:
        if self._failed:  # a bucket failed: send nothing more this iteration
            return
        try:
            link.remote.step_batch(items)
        except BaseException:
            self._failed = True
            raise
        link.registered.update(item[0] for item in items)

    def wait(self) -> None:
        """Send the partial buckets and wait for every reply; raise the first failure."""
        for link, (items, _) in self.buckets.items():
            self._send(link, items)
        self.buckets.clear()
        futures, self._futures = self._futures, []
        errors = [e for e in (f.exception() for f in futures) if e is not None]
        if errors:
            raise errors[0]

    def reset(self) -> None:
        self.sent.clear()
        self.buckets.clear()
        self.writebacks.clear()
        self._failed = False

    def close(self) -> None:
        for handle in self.hooks:
            handle.remove()
        self.hooks.clear()
        with contextlib.suppress(BaseException):
            self.wait()
        if self._pool is not None:
            self._pool.shutdown()
        self.reset()


def _ready(ref: weakref.ref[RemoteOptimizer], p: torch.Tensor) -> None:
    """The post-accumulate-grad hook of ``overlap=True`` (a weak reference: a dropped
    optimizer sends nothing)."""
    opt = ref()
    if opt is not None:
        opt._ready(p)


class RemoteOptimizer(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` whose steps run on stepd (any transport, or sharded).

    ``RemoteOptimizer(params, url, algorithm="adamw", **hyperparameters)`` with ``params`` as
    torch.optim takes them and ``url`` as :func:`stepd.client.connect` takes it (``local://``,
    ``http://``, ``shm://``, or a list of servers to shard over). Everything can also be a
    keyword (``RemoteOptimizer(params, **kwargs)``: how ``transformers.Trainer``'s
    ``optimizer_cls_and_kwargs`` calls it).

    Supported:

    - every hyperparameter of the algorithm, under torch.optim's names, as keyword arguments
      and per param group; ``param_groups`` show them all. For ``nadamw`` the defaults are
      ``torch.optim.NAdam``'s (``lr=2e-3, weight_decay=0, momentum_decay=4e-3,
      decoupled_weight_decay=False``: L2 decay, added to the gradient here exactly as torch
      does; ``decoupled_weight_decay=True`` decays on the server). ``adamw`` takes
      ``decoupled_weight_decay=True`` only, ``adam`` ``False`` only (as torch's AdamW / Adam);
      ``radam`` takes both (a server hyperparameter).
    - lr schedulers: a changed ``lr`` (a number or a 0-dim tensor) reaches the server when it
      is set (and is checked again before each step).
    - ``state_dict()`` in torch.optim's layout, tensors and plain values only (``torch.load``
      with ``weights_only=True`` reads it); ``load_state_dict`` takes it back, or a state dict
      of the torch.optim optimizer of the same update (``SGD``, ``Adam``, ``AdamW``,
      ``NAdam``, ``RAdam``...): slots keep torch's names (``exp_avg``, ``exp_avg_sq``,
      ``momentum_buffer``), ``step`` is the count of steps a parameter had.
    - Sophia: :meth:`update_hessian` and :meth:`hutchinson`.

    Accepted and ignored: ``foreach``, ``fused``, ``capturable``, ``differentiable`` (how torch
    would compute the step), ``amsgrad=False``, ``maximize=False``.

    Any hyperparameter changed in ``param_groups`` (``betas`` or ``momentum`` cycled by
    ``OneCycleLR`` / ``CyclicLR``, a weight-decay schedule) reaches the server when it is set,
    the optimizer state staying as it is; a change of the state's layout (``amsgrad``) is
    refused by the server, and ``decoupled_weight_decay`` cannot change
    (``NotImplementedError``).

    Not supported: ``amsgrad=True`` and ``maximize=True`` where the algorithm lacks them
    (``NotImplementedError`` naming the argument); sparse gradients (``TypeError``).

    Steps are counted per parameter, as torch does (``step_count="per_param"``, the default
    here where the algorithm's hyperparameters have it; ``step_count="global"`` is
    rlx-optim's count per run). Where they do not, the count is the run's: it differs from
    torch's only for a parameter skipped (``.grad is None``) in some iteration, and only in
    updates that depend on the step (bias corrections: Adam and kin; not SGD).
    ``amsgrad`` and ``maximize`` likewise go to the server where the algorithm has them.

    ``run``, ``fresh``, ``token``, ``timeout``, ``worker``, ``workers``, ``retries``: as for
    :func:`stepd.client.connect`. With ``run=`` all groups join that run; groups with the same
    hyperparameters are one server group there (their lr must stay equal).

    ``overlap=True`` hides the steps behind backward: each gradient is sent as soon as
    autograd has accumulated it (``register_post_accumulate_grad_hook``), in buckets of
    ``bucket_cap_mb`` megabytes per server group (DDP's name), so transfers and the server's
    kernels run while backward goes on; ``step()`` sends what is left, waits for the replies
    and writes the parameters back. The default bucket is smaller than DDP's 25 MB: a bucket
    costs one round trip here (tens of microseconds over shm://, about a millisecond over
    http://), and the last one is what ``step()`` waits for. Parameters are therefore updated during
    backward (a parameter once its gradient is complete, which no later part of that backward
    reads), with the results of ``overlap=False`` bit for bit. Off by default, because every
    backward then steps: gradients cannot be changed between backward and ``step()``
    (clipping, ``GradScaler``'s unscaling) nor accumulated over several backward passes
    except inside :meth:`no_sync`, and an ``lr`` or hyperparameter set between backward and
    ``step()`` would come too late. Each of these raises ``RuntimeError`` rather than step
    differently (a changed gradient or lr is found at ``step()``, when its step has run).
    Not with sync workers, whose rounds would meet in whatever order each worker's backward
    ends (``ValueError``); async workers are fine.
    """

    def __init__(
        self,
        params: ParamsT,
        url: str | Sequence[str] | None = None,
        algorithm: str = "adamw",
        *,
        run: str | None = None,
        fresh: bool = False,
        token: str | None = None,
        timeout: float = 30.0,
        worker: str | None = None,
        workers: Mapping[str, Any] | str | None = None,  # "torchrun": see connect()
        retries: int = 2,
        overlap: bool = False,
        bucket_cap_mb: float = 4.0,
        **hyperparams: Any,
    ) -> None:
        if url is None:
            raise TypeError("RemoteOptimizer needs url= (local://, http://, shm:// or a list)")
        if not isinstance(overlap, bool):
            raise TypeError(f"overlap must be a bool, got {overlap!r}")
        if (
            isinstance(bucket_cap_mb, bool)
            or not isinstance(bucket_cap_mb, (int, float))
            or not bucket_cap_mb > 0
        ):
            raise ValueError(f"Invalid bucket_cap_mb: {bucket_cap_mb!r} (a number > 0)")
        if overlap and workers is not None:
            mode = workers.get("mode", "sync") if isinstance(workers, Mapping) else "sync"
            if mode != "async":
                raise ValueError(
                    "overlap=True sends buckets in the order backward finishes them, and sync "
                    "workers' rounds would have to meet in that order on every worker: use "
                    "overlap=False with sync workers (async workers are fine)"
                )
        if not isinstance(algorithm, str):
            raise TypeError(f"algorithm must be a str, got {algorithm!r}")
        # The hyperparameter dataclasses give each algorithm's names and defaults (to fill
        # torch's param_groups and check a group before anything is sent; the server checks
        # again).
        from stepd.kernels.algorithms import ALGORITHMS

        if algorithm not in ALGORITHMS:
            raise ValueError(
                f"unknown algorithm {algorithm!r}; expected one of {', '.join(sorted(ALGORITHMS))}"
            )
        self.algorithm = algorithm
        self._hp_class = ALGORITHMS[algorithm].hyperparams
        names = self._hp_class.names()
        self._refused = tuple(k for k in REFUSED if k not in names)
        self._url = url
        self._connect: dict[str, Any] = {
            "run": run,
            "fresh": fresh,
            "token": token,
            "timeout": timeout,
            "worker": worker,
            "workers": workers,
            "retries": retries,
        }
        self._links: list[_Link] = []
        self._shared: dict[str, _Link] = {}  # named runs: server config -> its link
        self._where: dict[torch.Tensor, tuple[_Link, str]] = {}  # param -> (link, name)
        self._group_of: dict[torch.Tensor, _ParamGroup] = {}
        self._overlap = _Overlap(int(bucket_cap_mb * 2**20)) if overlap else None
        self._closed = False
        defaults = self._defaults(hyperparams)
        try:
            super().__init__(params, defaults)
        except BaseException:
            self.close()
            raise

    # -- param groups -----------------------------------------------------------------------

    def _defaults(self, given: Mapping[str, Any]) -> dict[str, Any]:
        names = self._hp_class.names()
        for key in self._refused:
            self._refuse(key, given.get(key, False))
        torch_only = set(IGNORED) | set(self._refused)
        if self.algorithm in _DECOUPLED:
            torch_only.add("decoupled_weight_decay")
        unknown = sorted(set(given) - set(names) - torch_only)
        if unknown:
            raise TypeError(
                f"{self.algorithm} got unknown argument(s) {', '.join(map(repr, unknown))}; "
                f"valid: {', '.join(names)} (and torch's {', '.join(sorted(torch_only))})"
            )
        server = {**TORCH_DEFAULTS.get(self.algorithm, {})}
        if "step_count" in names:  # count steps per parameter, as torch.optim does
            server["step_count"] = "per_param"
        server.update({k: _plain(v) for k, v in given.items() if k in names})
        resolved = self._hp_class.from_kwargs(**server).to_dict()  # TypeError / ValueError
        defaults = {k: _torch_value(v) for k, v in resolved.items()}
        if self.algorithm in _DECOUPLED:
            default, _ = _DECOUPLED[self.algorithm]
            defaults["decoupled_weight_decay"] = given.get("decoupled_weight_decay", default)
        if self.algorithm in ("adam", "adamw"):
            defaults.setdefault("amsgrad", False)
        defaults.setdefault("maximize", False)
        for key, ignored in IGNORED.items():
            defaults[key] = given.get(key, ignored)
        return defaults

    @staticmethod
    def _refuse(key: str, value: Any) -> None:
        if value:
            raise NotImplementedError(
                f"{key}=True is not implemented by stepd's kernels ({key}=False is accepted)"
            )

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's ``add_param_group``: the group's trainable parameters are registered with
        a server group of its hyperparameters right away."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, but got {type(param_group)}")
        for key in self._refused:
            self._refuse(key, param_group.get(key, False))
        group = _ParamGroup(param_group)
        super().add_param_group(group)
        try:
            self._attach(group, len(self.param_groups) - 1)
        except BaseException:
            self.param_groups.pop()
            raise

    def _groups(self) -> list[_ParamGroup]:
        return self.param_groups  # type: ignore[return-value]  # add_param_group makes them

    def _attach(self, group: _ParamGroup, index: int) -> None:
        params: list[torch.Tensor] = group["params"]
        if "param_names" in group:
            names = [str(n) for n in group["param_names"]]
        else:
            names = [f"g{index}.p{i}" for i in range(len(params))]
        taken = {n for g in self._groups()[:index] for n in g._names}
        for name in names:
            if not PARAM_NAME_RE.fullmatch(name):
                raise ValueError(f"invalid parameter name {name!r}: {PARAM_NAME_RULE}")
            if name in taken:
                raise ValueError(f"parameter name {name!r} appears more than once")
            taken.add(name)
        trainable = [(n, p) for n, p in zip(names, params, strict=True) if p.requires_grad]
        for name, p in trainable:
            self._check_dtype(name, p)
        hp, l2, decoupled = self._server_hyperparams(group)
        key = json.dumps([hp, l2, decoupled], sort_keys=True)
        link = self._shared.get(key) if self._connect["run"] is not None else None
        new = link is None
        if link is None:
            options = dict(self._connect)
            if self._links:  # fresh=True deletes the named run once, before the first group
                options["fresh"] = False
            remote = connect(self._url, self.algorithm, **options, **hp)
            link = _Link(remote, hp, float(hp["lr"]), l2, decoupled)
        try:
            for name, p in trainable:
                link.register(name, p)
        except BaseException:
            if new:
                link.remote.close()
            raise
        if new:
            self._links.append(link)
            if self._connect["run"] is not None:
                self._shared[key] = link
        link.groups.append(group)
        for name, p in zip(names, params, strict=True):
            self._where[p] = (link, name)
            self._group_of[p] = group
        if self._overlap is not None:
            ready = partial(_ready, weakref.ref(self))
            for _, p in trainable:
                self._overlap.hooks.append(p.register_post_accumulate_grad_hook(ready))
        group._names = names
        group._link = link
        group._owner = self

    def _server_hyperparams(self, group: Mapping[str, Any]) -> tuple[dict[str, Any], bool, Any]:
        """The group's server hyperparameters (resolved), whether its weight decay is L2 added
        here, and its ``decoupled_weight_decay`` (None where torch has no such option)."""
        hp = {k: _plain(group[k]) for k in self._hp_class.names() if k in group}
        decoupled = None
        l2 = False
        if self.algorithm in _DECOUPLED:
            decoupled = group.get("decoupled_weight_decay", _DECOUPLED[self.algorithm][0])
            allowed = _DECOUPLED[self.algorithm][1]
            if decoupled not in allowed:
                other = "adamw" if self.algorithm == "adam" else "adam"
                raise ValueError(
                    f"{self.algorithm} takes decoupled_weight_decay={allowed[0]} only (as "
                    f"torch.optim's); for decoupled_weight_decay={decoupled} use {other!r}"
                )
            if self.algorithm == "nadamw" and not decoupled:
                hp["weight_decay"] = 0.0  # torch's NAdam default: L2, added to the gradient
                l2 = True
        resolved = self._hp_class.from_kwargs(**hp).to_dict()
        return resolved, l2, decoupled

    def _fixed(self, link: _Link) -> list[str]:
        """The options a group cannot change once its server group exists."""
        keys = [
            k for k in self._hp_class.names() if k != "lr" and not (link.l2 and k == "weight_decay")
        ]
        if link.decoupled is not None:
            keys.append("decoupled_weight_decay")
        return keys

    def _fixed_value(self, link: _Link, key: str) -> Any:
        if key == "decoupled_weight_decay" and link.decoupled is not None:
            return link.decoupled
        return link.hyperparams[key]

    def _cannot_change(self, key: str, was: Any, now: Any) -> NotImplementedError:
        return NotImplementedError(
            f"stepd cannot change {key!r} of a param group once it exists ({_plain(was)!r} -> "
            f"{_plain(now)!r}): it decides how the adapter and the server split the update"
        )

    def _send_hyperparam(
        self, link: _Link, group: _ParamGroup | None, key: str, value: Any
    ) -> None:
        """A changed server hyperparameter (a scheduler cycling betas or momentum) goes to
        the server group at once — when every torch group stepped in it agrees (else the
        check before the next step says so)."""
        if _canon(value) == _canon(link.hyperparams[key]):
            return
        if any(_canon(g.get(key)) != _canon(value) for g in link.groups if g is not group):
            return
        now = link.remote.set_hyperparams(**{key: _plain(value)})
        link.hyperparams[key] = now[key]

    def _on_set(self, group: _ParamGroup, key: str, value: Any) -> None:
        """``group[key] = value`` is about to happen: send an lr now, refuse what the server
        cannot apply (nothing is stored then)."""
        link = group.link
        if (
            self._overlap is not None
            and self._overlap.sent
            and key in self._hp_class.names()
            and _canon(value) != _canon(group.get(key))
        ):
            raise self._too_late(key)
        if key in self._refused:
            self._refuse(key, value)
        elif key == "lr":
            lr = float(_plain(value))
            others = {float(_plain(g["lr"])) for g in link.groups if g is not group}
            if lr != link.lr and others <= {lr}:
                link.remote.set_lr(lr)
                link.lr = lr
        elif key in self._fixed(link) and key not in link.hyperparams:
            was = self._fixed_value(link, key)
            if _canon(value) != _canon(was):
                raise self._cannot_change(key, was, value)
        elif key in self._fixed(link):
            self._send_hyperparam(link, group, key, value)

    @staticmethod
    def _too_late(key: str) -> RuntimeError:
        return RuntimeError(
            f"{key!r} changed after backward sent this iteration's gradients (overlap=True), "
            "so their steps ran with the old value: change it before backward or after "
            "step(), or use overlap=False"
        )

    def _push(self, frozen: bool = False) -> None:
        """Before a step: each server group's lr is its torch groups' (sent if it changed),
        and nothing the server cannot change has changed. ``frozen``: steps of this
        iteration ran already (overlap), so a change raises instead."""
        for link in self._links:
            lrs = {float(_plain(g["lr"])) for g in link.groups}
            if len(lrs) > 1:
                raise ValueError(
                    f"param groups with the same hyperparameters share one server group in run "
                    f"{self._connect['run']!r}, so their lr must be equal; got {sorted(lrs)}"
                )
            for group in link.groups:
                for key in self._refused:
                    self._refuse(key, group.get(key, False))
                for key in self._fixed(link):
                    if key in link.hyperparams:  # a server hyperparameter: sent if changed
                        continue
                    was = self._fixed_value(link, key)
                    if _canon(group.get(key)) != _canon(was):
                        raise self._cannot_change(key, was, group.get(key))
            for key in self._fixed(link):
                if key not in link.hyperparams:
                    continue
                values = {json.dumps(_canon(g.get(key))) for g in link.groups}
                if len(values) > 1:
                    raise ValueError(
                        f"param groups with the same hyperparameters share one server group in "
                        f"run {self._connect['run']!r}, so their {key!r} must be equal; got "
                        f"{sorted(values)}"
                    )
                if link.groups:
                    value = link.groups[0].get(key)
                    if frozen and _canon(value) != _canon(link.hyperparams[key]):
                        raise self._too_late(key)
                    self._send_hyperparam(link, None, key, value)
            if lrs and (lr := lrs.pop()) != link.lr:
                if frozen:
                    raise self._too_late("lr")
                link.remote.set_lr(lr)
                link.lr = lr

    # -- steps ------------------------------------------------------------------------------

    @staticmethod
    def _check_dtype(name: str, p: torch.Tensor) -> None:
        if not isinstance(p, torch.Tensor) or p.dtype not in _PRECISIONS:
            raise TypeError(
                f"{name!r}: RemoteOptimizer takes float32, bfloat16, float16 or float64 "
                f"tensors, got {getattr(p, 'dtype', type(p))}"
            )

    @staticmethod
    def _sync(p: torch.Tensor, call: Callable[[np.ndarray], None]) -> None:
        """Run ``call`` on a numpy buffer of ``p``: ``p.data`` itself when it is a contiguous
        CPU tensor (written in place), else a copy that is written back afterwards."""
        data = p.data
        buf, shared = _numpy(data)
        call(buf)
        if not shared:
            _write_back(data, buf)

    def _l2(self, group: _ParamGroup) -> float:
        """The L2 decay added to the group's gradients here (0: none, or on the server)."""
        l2 = float(_plain(group["weight_decay"])) if group.link.l2 else 0.0
        if l2 and group.get("maximize") and "maximize" not in self._refused:
            l2 = -l2  # the server negates what it gets: torch's -g + wd * p
        return l2

    def _item(
        self,
        link: _Link,
        l2: float,
        name: str,
        p: torch.Tensor,
        grad: torch.Tensor,
        writebacks: list[tuple[torch.Tensor, np.ndarray]],
    ) -> StepItem:
        """``p``'s ``step_batch`` item; where ``p.data`` could not be lent as it is, the
        buffer to copy back after the step goes into ``writebacks``."""
        if grad.is_sparse or grad.layout != torch.strided:
            raise TypeError(
                f"{name!r}: sparse gradients are not supported (layout {grad.layout}); "
                "use a dense embedding (sparse=False)"
            )
        self._check_dtype(name, p)
        segment = link.shared.get(p)
        arrays = segment.arrays(p) if segment is not None and not l2 else None
        if arrays is not None:  # in shared memory already: nothing to copy
            return (name, tuple(p.shape), *arrays)
        if l2:
            grad = grad.add(p.detach(), alpha=l2)  # torch's NAdam: g + wd * p
        g, _ = _numpy(grad.detach())  # in the model's precision: half the bytes
        data = p.data
        buf, shared = _numpy(data)
        if not shared:
            writebacks.append((data, buf))
        return (name, tuple(p.shape), buf, g)

    @torch.no_grad()
    def _ready(self, p: torch.Tensor) -> None:
        """``overlap=True``: autograd has accumulated ``p.grad`` in this backward."""
        ov = self._overlap
        grad = p.grad
        if ov is None or ov.paused or self._closed or grad is None or p not in self._where:
            return
        link, name = self._where[p]
        if p in ov.sent:
            raise RuntimeError(
                f"{name!r}: a gradient was accumulated again after overlap=True sent it this "
                "iteration (its step has run): run the backward passes that accumulate "
                "inside `with optimizer.no_sync():`, the last one outside, or use overlap=False"
            )
        if not ov.sent:  # the first of the iteration: the lr in force now is its steps'
            self._push()
        item = self._item(link, self._l2(self._group_of[p]), name, p, grad, ov.writebacks)
        ov.sent[p] = (grad, grad._version)
        ov.add(link, item)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backward passes in this context send nothing (``overlap=True``): gradients
        accumulated over several of them are sent by the last backward, outside it (DDP's
        ``no_sync``). Nothing changes with ``overlap=False``."""
        ov = self._overlap
        if ov is not None:
            ov.paused += 1
        try:
            yield
        finally:
            if ov is not None:
                ov.paused -= 1

    def _idle(self, what: str) -> None:
        """Refuse ``what`` between a backward that sent gradients (overlap) and its step."""
        if self._overlap is not None and self._overlap.sent:
            raise RuntimeError(
                f"{what} between backward and step() with overlap=True: backward has sent "
                "this iteration's gradients and their steps have run; call step() first"
            )

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One iteration: every parameter with a ``.grad`` is stepped, then the run's step
        counter advances. Everything is checked before anything is sent (with
        ``overlap=True``: what backward did not send)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        ov = self._overlap
        sent: Mapping[torch.Tensor, Any] = {}
        writebacks: list[tuple[torch.Tensor, np.ndarray]] = []
        if ov is not None and ov.sent:
            sent, writebacks = dict(ov.sent), list(ov.writebacks)
            try:
                ov.wait()
            finally:  # the server's values (a failed bucket left its buffers as they were)
                ov.reset()
                for data, buf in writebacks:
                    _write_back(data, buf)
                writebacks = []
            changed = [
                self._where[p][1]
                for p, (grad, version) in sent.items()
                if p.grad is not grad or p.grad._version != version
            ]
            if changed:
                raise RuntimeError(
                    f"gradients of {', '.join(map(repr, changed[:3]))}"
                    f"{' and others' if len(changed) > 3 else ''} changed after backward sent "
                    "them (overlap=True), and their steps used them as backward left them: "
                    "clip or unscale gradients with overlap=False"
                )
        batches: dict[_Link, list[StepItem]] = {}
        for group in self._groups():
            link, names, params = group.link, group._names, group["params"]
            if len(names) != len(params):
                raise RuntimeError("a param group's 'params' changed: use add_param_group")
            l2 = self._l2(group)
            items = batches.setdefault(link, [])
            for name, p in zip(names, params, strict=True):
                grad = p.grad
                if grad is not None and p not in sent:
                    items.append(self._item(link, l2, name, p, grad, writebacks))
        self._push(frozen=bool(sent))
        for link, items in batches.items():
            if items:
                link.remote.step_batch(items)
                link.registered.update(item[0] for item in items)
        for data, buf in writebacks:
            _write_back(data, buf)
        self._end_iteration()
        return loss

    def _end_iteration(self) -> int:
        # anonymous: a run per server group, each advanced; named: one run, advanced once
        links = self._links if self._connect["run"] is None else self._links[:1]
        steps = [link.remote.end_iteration() for link in links]
        return steps[0] if steps else 0

    # -- Sophia -----------------------------------------------------------------------------

    def update_hessian(
        self, hessians: Mapping[torch.Tensor, torch.Tensor] | Iterable[tuple[torch.Tensor, Any]]
    ) -> None:
        """Pass Hessian-diagonal estimates (``{param: estimate}``, e.g. from
        :meth:`hutchinson`) for the next step (algorithm ``sophia``; others refuse it)."""
        self._idle("update_hessian()")
        pairs = hessians.items() if isinstance(hessians, Mapping) else hessians
        checked = []
        for p, h in pairs:
            where = self._where.get(p)
            if where is None:
                raise ValueError("update_hessian got a tensor that is not a parameter here")
            link, name = where
            est = torch.as_tensor(h).detach().to("cpu", torch.float32).contiguous()
            if est.shape != p.shape:
                raise ValueError(f"{name!r}: estimate shape {tuple(est.shape)} != {tuple(p.shape)}")
            checked.append((link, name, p, est.numpy()))
        for link, name, p, arr in checked:
            link.register(name, p)
            link.remote.update_hessian(name, tuple(p.shape), arr)

    def hutchinson(
        self,
        loss: torch.Tensor,
        params: Iterable[torch.Tensor] | None = None,
        *,
        samples: int = 1,
        generator: torch.Generator | None = None,
    ) -> dict[torch.Tensor, torch.Tensor]:
        """Hutchinson's Hessian-diagonal estimate of ``loss``: the mean over ``samples`` of
        ``z * (H z)``, ``z`` Rademacher (±1), by two backward passes (see :func:`hutchinson`).
        ``params``: default, every trainable parameter of this optimizer."""
        if params is None:
            params = [p for g in self.param_groups for p in g["params"] if p.requires_grad]
        return hutchinson(loss, params, samples=samples, generator=generator)

    # -- state ------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """torch.optim's layout: ``{"state": {id: {...}}, "param_groups": [{..., "params":
        [ids]}]}``, ids numbering the parameters of all groups in order, slots under torch's
        names plus ``step``; and ``"stepd"``: the run's global step, algorithm and lr scales.
        Tensors and plain values only."""
        self._idle("state_dict()")
        remote = {link: link.remote.state_dict() for link in self._links}
        global_step = int(remote[self._links[0]]["global_step"]) if self._links else 0
        state: dict[int, dict[str, Any]] = {}
        groups = []
        scales: dict[str, float] = {}
        index = 0
        for group in self._groups():
            sd = remote[group.link]
            ids = []
            for name in group._names:
                entry = sd["state"].get(name)
                if entry is not None:
                    state[index] = self._to_torch(group.link, entry)
                if name in sd.get("lr_scales", {}):
                    scales[name] = float(sd["lr_scales"][name])
                ids.append(index)
                index += 1
            packed = {k: v for k, v in group.items() if k != "params"}
            packed["params"] = ids
            groups.append(packed)
        meta = {"algorithm": self.algorithm, "global_step": global_step, "lr_scales": scales}
        return {"state": state, "param_groups": groups, "stepd": meta}

    def _to_torch(self, link: _Link, entry: Mapping[str, Any]) -> dict[str, Any]:
        count = int(entry["count"])
        out: dict[str, Any] = {}
        if self.algorithm != "sgd":
            out["step"] = torch.tensor(float(count), dtype=torch.float32)
        if self.algorithm == "nadamw":
            out["mu_product"] = torch.tensor(
                _mu_product(link.hyperparams, count), dtype=torch.float32
            )
        for slot, arr in entry["slots"].items():
            # float32; 8-bit state's codes stay uint8 (torch.uint8, as bitsandbytes keeps them)
            dtype = np.uint8 if arr.dtype == np.uint8 else np.float32
            out[slot] = torch.from_numpy(np.array(arr, dtype=dtype, copy=True))
        return out

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore from :meth:`state_dict`, or from the state dict of the torch.optim
        optimizer of the same update. Groups must match in number and size (torch's rule);
        the groups' options are the saved ones, and those other than ``lr`` must equal this
        optimizer's (a server group cannot change them). Checked before anything is sent."""
        self._idle("load_state_dict()")
        saved_groups = state_dict["param_groups"]
        saved_state = state_dict["state"]
        meta = state_dict.get("stepd") or {}
        if len(saved_groups) != len(self.param_groups):
            raise ValueError("loaded state dict has a different number of parameter groups")
        for group, saved in zip(self._groups(), saved_groups, strict=True):
            if len(group["params"]) != len(saved["params"]):
                raise ValueError(
                    "loaded state dict contains a parameter group that doesn't match the size "
                    "of optimizer's group"
                )
        if meta.get("algorithm", self.algorithm) != self.algorithm:
            raise ValueError(
                f"state dict is for algorithm {meta['algorithm']!r}, this optimizer runs "
                f"{self.algorithm!r}"
            )
        entries = {int(k): v for k, v in saved_state.items()}
        steps = [int(_plain(e["step"])) for e in entries.values() if "step" in e]
        global_step = int(meta.get("global_step", max(steps, default=0)))
        scales = dict(meta.get("lr_scales", {}))
        uploads: dict[_Link, dict[str, Any]] = {}
        frozen: list[tuple[_Link, str, torch.Tensor]] = []  # state for names not registered
        for group, saved in zip(self._groups(), saved_groups, strict=True):
            link = group.link
            for key in self._refused:
                self._refuse(key, saved.get(key, False))
            for key in self._fixed(link):
                was = self._fixed_value(link, key)
                if key in saved and _canon(saved[key]) != _canon(was):
                    raise self._cannot_change(key, was, saved[key])
            lr = float(_plain(saved.get("lr", group["lr"])))
            up = uploads.setdefault(
                link,
                {
                    "algorithm": self.algorithm,
                    "hyperparams": link.hyperparams,
                    "global_step": global_step,
                    "lr": lr,
                    "lr_scales": {},
                    "state": {},
                },
            )
            if up["lr"] != lr:
                raise ValueError("param groups sharing one server group must load one lr")
            for name, p, pid in zip(group._names, group["params"], saved["params"], strict=True):
                if name in scales:
                    up["lr_scales"][name] = float(scales[name])
                entry = entries.get(int(pid))
                if entry is None:
                    continue
                slots = {}
                for slot, value in entry.items():
                    if slot in _DERIVED or value is None:
                        continue
                    if not isinstance(value, torch.Tensor):
                        raise TypeError(f"{name!r}: state {slot!r} must be a tensor")
                    if slot == "max_exp_avg_sq" and "amsgrad" in self._refused:
                        self._refuse("amsgrad", True)
                    # float32; uint8 is 8-bit state's codes
                    wire_dtype = torch.uint8 if value.dtype == torch.uint8 else torch.float32
                    slots[slot] = value.detach().to("cpu", wire_dtype).contiguous().numpy()
                count = int(_plain(entry["step"])) if "step" in entry else max(global_step, 1)
                up["state"][name] = {"shape": list(p.shape), "count": count, "slots": slots}
                frozen.append((link, name, p))
        for link, name, p in frozen:
            link.register(name, p)
        for link, up in uploads.items():
            link.remote.load_state_dict(up)
            link.lr = up["lr"]
        # The model's weights are the truth now: frameworks resuming a run (Trainer,
        # accelerate) load them into the model, then load this state; the server's copy of
        # a registered parameter would otherwise overwrite them at the next step.
        for group in self._groups():
            link = group.link
            for name, p in zip(group._names, group["params"], strict=True):
                if name in link.registered:
                    self._sync(p, partial(link.remote.set_value, name, tuple(p.shape)))
        for group, saved in zip(self._groups(), saved_groups, strict=True):
            # the saved options over this group's (a torch.optim state dict lacks stepd's)
            keep = {"params", "param_names"}
            dict.update(group, {k: v for k, v in saved.items() if k not in keep})

    # -- the rest ---------------------------------------------------------------------------

    @property
    def remote(self) -> Any:
        """The first param group's stepd optimizer (:class:`stepd.client.StepdOptimizer`)."""
        return self._links[0].remote

    @property
    def remotes(self) -> list[Any]:
        """One stepd optimizer per server group, in the order of the param groups."""
        return [link.remote for link in self._links]

    def zero_grad(self, set_to_none: bool = True) -> None:
        """torch's ``zero_grad``; a gradient that lives in shared memory (shm://) is zeroed
        in place and stays, so the next backward accumulates straight into it."""
        self._idle("zero_grad()")
        super().zero_grad(set_to_none)
        for link in self._links:
            for p, shared in link.shared.items():
                if p.data.data_ptr() == shared.param.ctypes.data:
                    shared.grad_tensor.zero_()
                    p.grad = shared.grad_tensor

    def close(self) -> None:
        """Close every connection (an anonymous run is deleted with it); parameters that
        lived in shared memory move to ordinary memory first."""
        if self._closed:
            return
        self._closed = True
        overlap: _Overlap | None = getattr(self, "_overlap", None)
        if overlap is not None:
            overlap.close()  # replies still due land first
        for link in getattr(self, "_links", []):
            for p, shared in link.shared.items():
                if p.data.data_ptr() == shared.param.ctypes.data:
                    p.data = p.data.clone()
                if p.grad is not None and p.grad.data_ptr() == shared.grad.ctypes.data:
                    p.grad = p.grad.clone()
            link.shared.clear()
            link.remote.close()

    def __enter__(self) -> RemoteOptimizer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _mu_product(hyperparams: Mapping[str, Any], t: int) -> float:
    """NAdam's ``prod_{i <= t} mu_i`` (torch keeps it in each parameter's state)."""
    beta1, psi = hyperparams["betas"][0], hyperparams["momentum_decay"]
    product = 1.0
    for i in range(1, t + 1):
        product *= beta1 if psi is None else beta1 * (1.0 - 0.5 * 0.96 ** (i * psi))
    return product


def hutchinson(
    loss: torch.Tensor,
    params: Iterable[torch.Tensor],
    *,
    samples: int = 1,
    generator: torch.Generator | None = None,
) -> dict[torch.Tensor, torch.Tensor]:
    """Hutchinson's estimate of the Hessian diagonal of ``loss`` for each of ``params``:
    the mean over ``samples`` of ``z * (H z)`` with ``z`` Rademacher (±1 entries), whose
    expectation is ``diag(H)``. ``H z`` comes from differentiating ``grad(loss) . z``; the
    graph of ``loss`` is kept, so ``loss.backward()`` may follow. ``generator``: a CPU
    ``torch.Generator`` for reproducible ``z``."""
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be an int >= 1, got {samples!r}")
    params = list(params)
    grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
    sums = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    for _ in range(samples):
        zs = [
            (torch.randint(0, 2, p.shape, generator=generator) * 2 - 1).to(p.device, p.dtype)
            for p in params
        ]
        if live:
            hvs = torch.autograd.grad(
                [grads[i] for i in live],
                [params[i] for i in live],
                grad_outputs=[zs[i] for i in live],
                retain_graph=True,
                allow_unused=True,
            )
            for i, hv in zip(live, hvs, strict=True):
                if hv is not None:
                    sums[i] += (zs[i] * hv).detach()
    return {p: s / samples for p, s in zip(params, sums, strict=True)}


__all__ = ["RemoteOptimizer", "hutchinson"]
