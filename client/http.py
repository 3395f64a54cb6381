"""``http://host:port``: the stepd HTTP API through one keep-alive ``httpx.Client``.

Tensors travel as raw little-endian float32 bytes (one parameter) or safetensors (a batch);
JSON carries metadata only. An optional bearer token goes on every request.

**Registration.** A name's first ``step`` (or :meth:`StepdOptimizer.register`) posts it to
``/v1/params`` with the local ``param`` as its initial value and the group
``{algorithm, hyperparams}`` of this optimizer (plus any lr_scale set before). If the server
already holds the name with the same shape, group and lr_scale (HTTP 200), **the server's copy
wins**: its value is downloaded and overwrites the local ``param`` before the step, so a
worker that joins (or restarts) continues from the server's weights. Another config is a
``ConflictError``.

**load_state_dict** uploads the optimizer state with ``PUT /v1/groups/{id}/state``
(safetensors, :mod:`stepd.client.state`): the state of names already registered goes at once,
replacing the group's state on the server (its other names start afresh, as in process) and
setting the server-wide global step; the state of names not registered yet stays pending
and is uploaded right after each registers, before its first step (so the loaded state wins
over the server's copy for those names; parameter values are not optimizer state and follow
the rule above). ``lr`` / ``lr_scale`` / ``state_dict`` show the loaded values at once.

**Retries.** Every step (``step`` and ``step_batch``) carries a header
``X-Stepd-Request-Id: <128 random bits, hex>-<counter>``, new for each call. After a transport
failure (connect, read or write error, timeout) the client resends the *same* request — same
id, same body — up to ``retries`` times (``connect(..., retries=2)``; 0 disables), with a
short backoff, then raises ``TransportError``. The server remembers the ids it has applied
(the last few thousand) and answers a repeated id with the reply recorded for it instead of
applying the gradient again, so a step whose reply was lost is applied exactly once; in a
sync group a repeated delivery does not count as a second contribution either.
``end_iteration`` is never retried (it has no id; a retry could advance the step twice).
Idempotent calls (reads, registration, setting lr / lr_scale) are retried once after a
transport failure. The local ``param`` is written only once a full reply is in hand: a step
that fails leaves it exactly as it was.
"""

from __future__ import annotations

import base64
import itertools
import json
import math
import secrets
import time
from collections.abc import Collection, Iterator, Mapping
from typing import Any
from urllib.parse import quote

import httpx
import numpy as np

from . import _safetensors
from .errors import TransportError, error_for_status
from .state import StateLoad, StateUploads
from .transport import (
    EndIteration,
    GetLr,
    GetLrScale,
    GetStateDict,
    Item,
    LoadStateDict,
    Op,
    Register,
    SetLr,
    SetLrScale,
    Step,
    Transport,
    UpdateHessian,
)

# Bodies above this go out in pieces of this size (see _Body).
CHUNK = 1 << 20
OCTET = {"content-type": "application/octet-stream"}
SAFETENSORS = {"content-type": "application/x-safetensors"}
F32 = np.dtype("<f4")


class _Body:
    """A large request body sent in ``CHUNK`` pieces, with its Content-Length (not chunked
    transfer encoding), straight from the arrays' memory.

    httpcore sends a ``bytes`` body by slicing off what each ``send`` took (``buffer =
    buffer[n:]``), which copies the rest every time: quadratic, 4 s for a 256 MB gradient that
    takes 0.55 s in pieces. Iterable again and again, so a retry resends the same body.
    """

    def __init__(self, parts: list[bytes | memoryview]) -> None:
        self._parts = [memoryview(p).cast("B") for p in parts]
        self.nbytes = sum(len(p) for p in self._parts)

    def __iter__(self) -> Iterator[memoryview]:
        for part in self._parts:
            for i in range(0, len(part), CHUNK):
                yield part[i : i + CHUNK]


def _content(parts: list[bytes | memoryview], headers: dict[str, str]) -> dict[str, Any]:
    """``content=`` and ``headers=`` for httpx: small bodies as bytes (one write), large
    ones as a :class:`_Body`."""
    body = _Body(parts)
    if body.nbytes <= CHUNK:
        return {"content": b"".join(parts), "headers": headers}
    return {"content": body, "headers": {**headers, "content-length": str(body.nbytes)}}


def _raw(arr: np.ndarray) -> list[bytes | memoryview]:
    """A contiguous float32 array's bytes, as a view (no copy)."""
    return [memoryview(arr.reshape(-1)).cast("B")] if arr.size else [b""]


def _path(name: str) -> str:
    return quote(name, safe="")


def _detail(r: httpx.Response) -> Any:
    try:
        return r.json()["detail"]
    except (ValueError, KeyError, TypeError):
        return r.text


class HttpTransport(StateUploads, Transport):
    """Talks to ``stepd serve``; ``timeout`` (seconds) bounds every request."""

    def __init__(
        self,
        url: str,
        algorithm: str,
        hyperparams: Mapping[str, Any],
        token: str | None = None,
        timeout: float = 30.0,
        worker: str | None = None,
        workers: Mapping[str, Any] | None = None,
        shard: tuple[int, int] | None = None,
        retries: int = 2,
    ) -> None:
        """``retries``: how often a step is resent (same request id) after a transport
        failure; ``worker``: this process's id, sent with every step and ``end_iteration`` (sync
        groups need it); ``workers``: the group's workers config (``{"mode": "sync", "count":
        4}``, ``{"mode": "async", "max_staleness": 8}``; see the server's service/workers.py);
        ``shard``: the (index, count) this server has in a sharded deployment, checked by the
        server at registration."""
        headers = {"user-agent": "stepd-client"}
        if token:
            headers["authorization"] = f"Bearer {token}"
        self.url = url.rstrip("/")
        self._algorithm = algorithm
        self._hyperparams = dict(hyperparams)
        self._group_spec: dict[str, Any] = {
            "algorithm": algorithm,
            "hyperparams": self._hyperparams,
        }
        if workers is not None:
            self._group_spec["workers"] = dict(workers)
        self._async = workers is not None and workers.get("mode") == "async"
        self._worker_query = {"worker": worker} if worker is not None else {}
        self._shard = shard
        if isinstance(retries, bool) or not isinstance(retries, int) or not 0 <= retries <= 10:
            raise ValueError(f"retries must be an int in [0, 10], got {retries!r}")
        self._retries = retries
        self._request_prefix = secrets.token_hex(16)  # 128 random bits: unique across clients
        self._request_counter = itertools.count(1)
        self._versions: dict[str, int] = {}  # async groups: the version each param came from
        self._http = httpx.Client(
            base_url=self.url,
            headers=headers,
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
        )
        self._registered: dict[str, tuple[int, ...]] = {}
        self._group_id: str | None = None
        self._lr: float | None = None  # set_lr before the group exists on the server
        self._pending_scales: dict[str, float] = {}  # set_lr_scale before registration
        self._explicit_scales: set[str] = set()
        self._pending_load: StateLoad | None = None  # load_state_dict not fully uploaded yet

    # -- plumbing ---------------------------------------------------------------------------

    def request(
        self, method: str, path: str, *, retry: bool | int = False, **kw: Any
    ) -> httpx.Response:
        """One request; error statuses raise ``ServerError`` subclasses with the detail.

        ``retry``: resend it after a transport failure (``True``: once; an int: that many
        times, with a short backoff): only for requests that are safe to repeat."""
        attempts = 1 + int(retry)
        for attempt in range(attempts):
            try:
                r = self._http.request(method, path, **kw)
            except httpx.TransportError as exc:  # connect/read/write errors and timeouts
                if attempt + 1 < attempts:
                    time.sleep(min(0.05 * 2**attempt, 1.0))
                    continue
                raise TransportError(f"{method} {self.url}{path}: {exc!r}") from exc
            except httpx.HTTPError as exc:
                raise TransportError(f"{method} {self.url}{path}: {exc!r}") from exc
            if r.is_success:
                return r
            raise error_for_status(r.status_code, _detail(r), method, path)
        raise AssertionError("unreachable")

    def _json(self, method: str, path: str, **kw: Any) -> Any:
        r = self.request(method, path, **kw)
        try:
            return r.json()
        except ValueError as exc:
            raise TransportError(f"{method} {path}: reply is not JSON") from exc

    def _tensor(self, path: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
        """GET a raw float32 tensor; its shape from ``X-Stepd-Shape`` unless given."""
        r = self.request("GET", path, retry=True)
        if shape is None:
            header = r.headers.get("x-stepd-shape", "")
            shape = tuple(int(d) for d in header.split(",")) if header else ()
        if len(r.content) != math.prod(shape) * 4:
            raise TransportError(
                f"GET {path}: {len(r.content)} bytes, shape {list(shape)} needs "
                f"{math.prod(shape) * 4}"
            )
        return np.frombuffer(r.content, dtype=F32).reshape(shape)

    def check(self) -> dict[str, Any]:
        """``GET /v1/status``: reachable, and the token (if any) is accepted."""
        return self._json("GET", "/v1/status", retry=True)

    def close(self) -> None:
        self._http.close()

    # -- ops --------------------------------------------------------------------------------

    def handle(self, op: Op) -> Any:
        match op:
            case Step(items=items):
                return self._step(items)
            case Register(items=items):
                return self._ensure_registered(items)
            case EndIteration():
                r = self._json("POST", "/v1/iteration/end", params=self._worker_query)
                if self._pending_load is not None and self._pending_load.first:
                    return self._pending_load.advance()  # the loaded step, not uploaded yet
                return int(r["global_step"])
            case GetLr():
                return self._get_lr()
            case SetLr(lr=lr):
                return self._set_lr(lr)
            case GetLrScale(name=name):
                if name in self._registered:
                    r = self._json("GET", f"/v1/params/{_path(name)}/lr_scale", retry=True)
                    return float(r["lr_scale"])
                return self._pending_scales.get(name, 1.0)
            case SetLrScale(name=name, scale=scale):
                if name in self._registered:
                    body = {"lr_scale": scale}
                    self.request("PUT", f"/v1/params/{_path(name)}/lr_scale", json=body, retry=True)
                else:
                    self._pending_scales[name] = scale
                self._explicit_scales.add(name)
                return None
            case GetStateDict():
                return self._state_dict()
            case UpdateHessian(name=name, hessian=hessian):
                return self._update_hessian(name, hessian)
            case LoadStateDict(state=state):
                return self._load_state(state)
        raise TypeError(f"unknown op {op!r}")

    def _ensure_registered(self, items: tuple[Item, ...]) -> None:
        for name, shape, param, _ in items:
            if name not in self._registered:
                self._register(name, shape, param)
        if self._pending_load is not None:  # loaded state of names registered just now
            self._upload_state(self._pending_load)

    def _registered_names(self) -> Collection[str]:
        return self._registered

    def _send_state(self, group_id: str, body: bytes) -> None:
        """``PUT /v1/groups/{id}/state``."""
        path = f"/v1/groups/{_path(group_id)}/state"
        self.request("PUT", path, **_content([body], SAFETENSORS), retry=True)

    def _register(self, name: str, shape: tuple[int, ...], param: np.ndarray) -> None:
        body = {
            "name": name,
            "shape": list(shape),
            "group": self._group_spec,
            "lr_scale": self._pending_scales.get(name, 1.0),
            "value": base64.b64encode(param.tobytes()).decode("ascii"),
        }
        if self._shard is not None:
            body["shard"] = {"index": self._shard[0], "count": self._shard[1]}
        r = self.request("POST", "/v1/params", json=body, retry=True)
        server_copy = None
        if r.status_code == 200:  # already there with the same config: the server's copy wins
            server_copy = self._tensor(f"/v1/params/{_path(name)}/value", shape)
        gid = r.json()["group"]
        if self._group_id is None:
            self._group_id = gid
            if self._lr is not None:  # set_lr came before the group existed
                self._put_lr(self._lr)
        self._registered[name] = shape
        self._versions[name] = int(r.json()["version"])
        self._pending_scales.pop(name, None)
        if server_copy is not None:
            np.copyto(param.reshape(-1), server_copy.reshape(-1))

    def _update_hessian(self, name: str, hessian: np.ndarray) -> None:
        """``POST /v1/params/{name}/hessian`` (raw float32). Never retried: the server folds
        the estimate into a moving average, so a repeat would count it twice."""
        path = f"/v1/params/{_path(name)}/hessian"
        self.request("POST", path, **_content(_raw(hessian), OCTET))

    def _request_id(self) -> str:
        """A fresh ``X-Stepd-Request-Id``: this client's random prefix and a counter."""
        return f"{self._request_prefix}-{next(self._request_counter)}"

    def _step(self, items: tuple[Item, ...]) -> None:
        self._ensure_registered(items)
        rid = {"x-stepd-request-id": self._request_id()}  # the same on every retry
        if len(items) == 1:
            [(name, _, param, grad)] = items
            query = dict(self._worker_query)
            if self._async:
                query["version"] = self._versions[name]
            r = self.request(
                "POST",
                f"/v1/params/{_path(name)}/step",
                **_content(_raw(grad), {**OCTET, **rid}),
                params=query,
                retry=self._retries,
            )
            if len(r.content) != param.nbytes:
                raise TransportError(
                    f"step {name!r}: reply has {len(r.content)} bytes, expected {param.nbytes}"
                )
            np.copyto(param.reshape(-1), np.frombuffer(r.content, dtype=F32))
            if "x-stepd-version" in r.headers:
                self._versions[name] = int(r.headers["x-stepd-version"])
            return
        meta = None
        if self._async:
            meta = {"versions": json.dumps({name: self._versions[name] for name, *_ in items})}
        parts = _safetensors.dump_parts(
            {name: grad.reshape(shape) for name, shape, _, grad in items}, meta
        )
        r = self.request(
            "POST",
            "/v1/step",
            **_content(parts, {**SAFETENSORS, **rid}),
            params=self._worker_query,
            retry=self._retries,
        )
        try:
            out, reply_meta = _safetensors.parse(r.content)
            versions = json.loads(reply_meta.get("versions", "{}"))
        except (ValueError, KeyError, TypeError) as exc:
            raise TransportError(f"POST /v1/step: malformed safetensors reply: {exc}") from exc
        for name, _, param, _ in items:  # check everything before writing anything
            got = out.get(name)
            if got is None or got.size != param.size:
                raise TransportError(f"POST /v1/step: reply lacks a matching {name!r}")
        for name, _, param, _ in items:
            np.copyto(param.reshape(-1), out[name].reshape(-1))
            if name in versions:
                self._versions[name] = int(versions[name])

    def _put_lr(self, lr: float) -> None:
        body = {"lr": lr, "group": self._group_id}
        self.request("PUT", "/v1/lr", json=body, retry=True)

    def _set_lr(self, lr: float) -> None:
        if self._group_id is not None:
            self._put_lr(lr)
        self._lr = lr

    def _group(self) -> dict[str, Any] | None:
        if self._group_id is None:
            return None
        groups = self._json("GET", "/v1/groups", retry=True)
        return next((g for g in groups if g["id"] == self._group_id), None)

    def _get_lr(self) -> float | None:
        group = self._group()
        if group is not None:
            return float(group["lr"])
        return self._lr if self._lr is not None else self._hyperparams.get("lr")

    def _state_dict(self) -> dict[str, Any]:
        """Assembled from /v1/status, /v1/params, per-param stats and raw slot downloads.

        Not atomic: take it between steps. ``count`` is the optimizer's (steps applied, or
        the loaded count). Covers every parameter of this optimizer's group on the server,
        and the loaded state still pending (names not registered yet).
        """
        sd = self._server_state_dict()
        if self._pending_load is None:
            return sd
        return self._pending_load.overlay(sd, self._pending_scales)

    def _server_state_dict(self) -> dict[str, Any]:
        status = self._json("GET", "/v1/status", retry=True)
        groups = {g["id"]: g for g in status["groups"]}
        group = groups.get(self._group_id) if self._group_id else None
        if group is None:  # nothing registered yet: what connect() was given
            lr = self._lr if self._lr is not None else self._hyperparams.get("lr")
            return {
                "algorithm": self._algorithm,
                "hyperparams": json.loads(json.dumps(self._hyperparams)),
                "global_step": int(status["global_step"]),
                "lr": lr,
                "lr_scales": {n: self._pending_scales[n] for n in self._pending_scales},
                "state": {},
            }
        lr_scales: dict[str, float] = {}
        state: dict[str, Any] = {}
        for info in self._json("GET", "/v1/params", retry=True):
            if info["group"] != self._group_id:
                continue
            name = info["name"]
            if info["lr_scale"] != 1.0 or name in self._explicit_scales:
                lr_scales[name] = float(info["lr_scale"])
            stats = self._json("GET", f"/v1/params/{_path(name)}/stats", retry=True)
            if stats.get("count") is None:
                continue  # never stepped (nor loaded): no state yet, as in process
            slots = {
                slot: np.array(self._tensor(f"/v1/params/{_path(name)}/state/{_path(slot)}"))
                for slot in stats["slots"]
            }
            state[name] = {"shape": list(info["shape"]), "count": stats["count"], "slots": slots}
        return {
            "algorithm": group["algorithm"],
            "hyperparams": group["hyperparams"],
            "global_step": int(status["global_step"]),
            "lr": float(group["lr"]),
            "lr_scales": lr_scales,
            "state": state,
        }
