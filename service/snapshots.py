"""The store's state as one snapshot — the format of checkpoints — and group state uploads.

A snapshot is tensors ``param/<name>`` (the parameter, its shape) and ``state/<name>/<slot>``
(every optimizer slot) plus JSON metadata: ``format`` (1), the run's ``global_step``, each
group's ``algorithm``, ``hyperparams``, ``workers``, ``lr`` and ``lr_scales``, and each
parameter's ``shape``, ``group``, ``version`` and ``count``. :meth:`Snapshots.restore`
rebuilds a store from one; :meth:`Snapshots.load_group_state` replaces one group's optimizer
state (a client's ``load_state_dict``). Both validate everything, into new optimizers,
before they swap anything in: a bad input changes nothing.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

import numpy as np
from stepd.kernels import Optimizer, create_optimizer

from .entries import Entry
from .errors import Conflict, Invalid, NotFound
from .groups import Group, check_name, resolve_group
from .history import PARAM_FIELDS, History
from .requests import RequestLog
from .rwlock import RWLock

T = TypeVar("T")


class Snapshots:
    """The snapshot half of :class:`stepd.service.store.ParamStore`."""

    device: str
    backend: Any
    xp: Any
    lock: RWLock
    _meta: threading.Lock
    _entries: dict[str, Entry]
    _groups: dict[str, Optimizer]
    history: int  # samples of its measured norms each parameter keeps
    _group_info: dict[str, Group]
    global_step: int
    requests: RequestLog

    def entry(self, name: str) -> Entry:
        raise NotImplementedError

    def iter_entries(self) -> Iterator[Entry]:
        raise NotImplementedError

    def _host(self, arr: Any) -> np.ndarray:
        raise NotImplementedError

    def write_snapshot(
        self, write: Callable[[dict[str, Any], dict[str, Any]], T], device: bool = False
    ) -> T:
        """Call ``write(tensors, meta)`` with steps held off: on the CPU the tensors are the
        live buffers themselves, so a checkpoint costs no copy and no extra memory. On a
        CUDA store they are host copies, or with ``device`` the live device arrays: for a
        writer that streams them to the host a piece at a time (``tensorfile.write_file``),
        so host memory stays bounded whatever the state's size."""
        with self.lock.exclusive():
            return write(*self._snapshot(copy=False, live=device))

    def _snapshot(self, copy: bool, live: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
        tensors: dict[str, Any] = {}
        params = {}
        for e in self._entries.values():
            on_host = not live and self.xp is not np
            value = self._host(e.param) if copy or on_host else e.param
            tensors[f"param/{e.name}"] = value.reshape(e.shape)
            params[e.name] = {"shape": list(e.shape), "group": e.group.id, "version": e.version}
        groups = {}
        for gid, opt in self._groups.items():
            sd = opt.state_dict(copy=copy, live=live and not copy)
            for name, st in sd["state"].items():
                for slot, arr in st["slots"].items():
                    tensors[f"state/{name}/{slot}"] = arr
                params[name]["count"] = st["count"]
            groups[gid] = {
                "workers": dict(self._group_info[gid].workers),
                "algorithm": sd["algorithm"],
                "hyperparams": dict(self._group_info[gid].hyperparams),  # the group's identity
                "current_hyperparams": sd["hyperparams"],  # as changed since (set_hyperparams)
                "lr": sd["lr"],
                "lr_scales": sd["lr_scales"],
            }
        meta = {
            "format": 1,
            "global_step": self.global_step,
            "groups": groups,
            "params": params,
        }
        return tensors, meta

    def new_history(self) -> History:
        return History(self.history, PARAM_FIELDS)

    def restore(
        self, tensors: Mapping[str, np.ndarray], meta: Mapping[str, Any], fresh: bool = False
    ) -> None:
        """Replace everything with a snapshot; validated fully before the swap. ``fresh``:
        the tensors are new arrays of their own with every parameter screened finite (as
        :meth:`CheckpointDir.load_info` reads them), kept as they are where they are this
        store's kind of array (host arrays on the CPU; device arrays a CUDA store's load
        uploaded, piece by piece through a bounded host buffer): no copy, no second screen.

        All or nothing: the new arrays exist before the old ones are dropped, so a restore
        needs room for both on the device for a moment; a failure before the swap (a bad
        snapshot, a device allocation) leaves the store as it was. Restoring in place instead
        would bound the device memory but could leave half a state behind after a failure
        part way (a read error, the file changed between passes), so it is not done."""
        try:
            global_step = meta["global_step"]
            if isinstance(global_step, bool) or not isinstance(global_step, int) or global_step < 0:
                raise ValueError(f"global_step must be an int >= 0, got {global_step!r}")
            built: dict[str, Optimizer] = {}
            infos: dict[str, Group] = {}
            for gid, g in meta["groups"].items():
                group, _ = resolve_group(g["algorithm"], g["hyperparams"], g.get("workers"))
                current = g.get("current_hyperparams", g["hyperparams"])  # older files: same
                opt = create_optimizer(g["algorithm"], backend=self.device, **current)
                state = {}
                for name, p in meta["params"].items():
                    if p["group"] != gid or "count" not in p:
                        continue
                    slots = {  # device arrays stay on the device
                        k.rsplit("/", 1)[1]: _host_or_own(self.xp, v)
                        for k, v in tensors.items()
                        if k.startswith(f"state/{name}/")
                    }
                    state[name] = {"shape": p["shape"], "count": p["count"], "slots": slots}
                opt.load_state_dict(
                    {
                        "algorithm": g["algorithm"],
                        "hyperparams": current,
                        "global_step": global_step,
                        "lr": g["lr"],
                        "lr_scales": g["lr_scales"],
                        "state": state,
                    },
                    copy=not fresh,
                )
                built[group.id] = opt
                infos[group.id] = group
            entries = {}
            for name, p in meta["params"].items():
                check_name(name)
                value = tensors[f"param/{name}"]
                shape = tuple(p["shape"])
                bad_dtype = value.dtype != np.float32  # U8 is for 8-bit state only
                if tuple(value.shape) != shape or p["group"] not in built or bad_dtype:
                    raise Invalid(f"checkpoint entry {name!r} is inconsistent")
                if not fresh and not self.backend.all_finite(
                    np.ascontiguousarray(value, np.float32)
                ):
                    raise Invalid(f"checkpoint entry {name!r} has non-finite values")
                param = _flat(self.xp, value, keep=fresh)
                entries[name] = Entry(
                    name,
                    shape,
                    infos[p["group"]],
                    param,
                    int(p["version"]),
                    history=self.new_history(),
                )
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:
            raise Invalid(f"checkpoint is malformed: {exc!r}") from None
        with self.lock.exclusive(), self._meta:
            self._groups, self._group_info, self._entries = built, infos, entries
            self.global_step = global_step
            self.requests = RequestLog()  # ids applied to the replaced state may apply again

    # -- loading a group's optimizer state (client load_state_dict) -------------------------

    def load_group_state(
        self, group_id: str, tensors: Mapping[str, Any], meta: Mapping[str, str]
    ) -> None:
        """Replace a group's optimizer state, as ``kernels.Optimizer.load_state_dict`` does.

        ``tensors``: ``{param}/{slot}`` float32 arrays; ``meta``: safetensors metadata, each
        value JSON: ``algorithm`` and ``hyperparams`` (must be the group's: 409), ``counts``
        ``{param: count}`` (the parameters whose state is given) and ``shapes`` ``{param:
        shape}`` (each must be the registered one: 409), and optionally ``lr``,
        ``lr_scales`` ``{param: scale}``, ``global_step`` and ``replace`` (default true:
        parameters of the group absent from ``counts`` lose their state, fresh as after a
        local ``load_state_dict``; false: only the named ones change). ``global_step`` is
        server-wide: every group's optimizer gets it, as in :meth:`restore`. Every named
        parameter must be registered in this group with the shape of its state (404 / 409 /
        422). Parameter values and versions are left alone (torch semantics). Everything is
        validated, into a new optimizer for the group, before the swap: a bad upload
        changes nothing.
        """
        fields = _decode_meta(meta)
        counts, lr_scales = fields.get("counts", {}), fields.get("lr_scales", {})
        shapes = fields.get("shapes", {})
        replace, global_step = fields.get("replace", True), fields.get("global_step")
        for key, value in (("counts", counts), ("lr_scales", lr_scales), ("shapes", shapes)):
            if not isinstance(value, dict):
                raise Invalid(f"state metadata {key!r} must be an object, got {value!r}")
        if not isinstance(replace, bool):
            raise Invalid(f"state metadata 'replace' must be true or false, got {replace!r}")
        slots: dict[str, dict[str, Any]] = {name: {} for name in counts}
        for key, arr in tensors.items():
            name, _, slot = key.partition("/")
            if name not in slots or not slot:
                raise Invalid(f"state tensor {key!r} is not '<param>/<slot>' of a param in counts")
            slots[name][slot] = np.ascontiguousarray(arr)  # the algorithm checks each dtype
        with self.lock.exclusive(), self._meta:
            opt = self._groups.get(group_id)
            if opt is None:
                raise NotFound(f"group {group_id!r} does not exist")
            group = self._group_info[group_id]
            if fields.get("algorithm") != group.algorithm:
                raise Conflict(
                    f"the state is for algorithm {fields.get('algorithm')!r}, group "
                    f"{group_id!r} runs {group.algorithm!r}"
                )
            hyperparams = fields.get("hyperparams")
            if not isinstance(hyperparams, dict):
                raise Invalid(
                    f"state metadata 'hyperparams' must be an object, got {hyperparams!r}"
                )
            given, _ = resolve_group(group.algorithm, hyperparams, group.workers)
            now = opt.hyperparams.to_dict()  # as changed since the group was made, if at all
            if given.hyperparams != now:
                raise Conflict(
                    f"the state's hyperparams {dict(given.hyperparams)} differ from group "
                    f"{group_id!r}'s {now}"
                )
            for name in {**counts, **lr_scales}:
                e = self.entry(check_name(name))
                if e.group.id != group_id:
                    raise Conflict(f"{name!r} belongs to group {e.group.id!r}, not {group_id!r}")
            current = opt.state_dict(copy=False)
            state = {} if replace else dict(current["state"])
            for name, count in counts.items():
                shape = list(self._entries[name].shape)
                if shapes.get(name) != shape:
                    raise Conflict(
                        f"{name!r} is registered with shape {shape}, its state is for shape "
                        f"{shapes.get(name)!r}"
                    )
                state[name] = {"shape": shape, "count": count, "slots": slots[name]}
            sd = {
                "algorithm": group.algorithm,
                "hyperparams": now,
                "global_step": self.global_step if global_step is None else global_step,
                "lr": fields.get("lr", current["lr"]),
                "lr_scales": {**current["lr_scales"], **lr_scales},
                "state": state,
            }
            built = create_optimizer(group.algorithm, backend=self.device, **now)
            try:
                built.load_state_dict(sd)
            except (KeyError, TypeError, ValueError, OverflowError) as exc:
                raise Invalid(f"group {group_id!r}: invalid state: {exc}") from None
            others = {}
            if built.global_step != self.global_step:  # server-wide: every group follows
                for gid, other in self._groups.items():
                    if gid != group_id:
                        g = self._group_info[gid]
                        others[gid] = create_optimizer(
                            g.algorithm, backend=self.device, **other.hyperparams.to_dict()
                        )
                        others[gid].load_state_dict(
                            {**other.state_dict(copy=False), "global_step": built.global_step}
                        )
            self._groups.update(others)
            self._groups[group_id] = built
            self.global_step = built.global_step


def _host_or_own(xp: Any, value: Any) -> Any:
    """``value`` itself if it is an ``xp`` array already, else a contiguous host array."""
    return value if isinstance(value, xp.ndarray) else np.ascontiguousarray(value)


def _flat(xp: Any, value: Any, keep: bool) -> Any:
    """``value`` as a flat contiguous float32 array of ``xp``; ``keep``: the array itself
    where it already is one of ``xp`` (a fresh array nobody else holds)."""
    if keep and isinstance(value, xp.ndarray) and value.dtype == np.float32:
        flags = value.flags
        if flags.c_contiguous and (xp is not np or flags.writeable):
            return value.reshape(-1)
    return xp.array(_host_or_own(xp, value).reshape(-1), copy=True)


def _decode_meta(meta: Mapping[str, str]) -> dict[str, Any]:
    """safetensors metadata (strings) whose values are JSON, decoded."""
    out = {}
    for key, raw in meta.items():
        try:
            out[key] = json.loads(raw)
        except (TypeError, ValueError, RecursionError):
            raise Invalid(f"state metadata {key!r} is not JSON: {raw[:200]!r}") from None
    return out
