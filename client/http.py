"""``http://host:port``: requests to the stepd HTTP API through one keep-alive ``httpx.Client``.

Tensors travel as raw little-endian float32 bytes (one parameter) or safetensors (a batch);
JSON carries metadata only. An optional bearer token goes on every request. Every request
after :meth:`HttpTransport.open_run` acts on that run (``/v1/runs/{run}/...``). The policy —
when to register, retry, upload state — is the session's (:mod:`stepd.client.session`); this
module only moves requests and replies. A param is written only once a full reply is in
hand: a request that fails leaves it exactly as it was.
"""

from __future__ import annotations

import base64
import contextlib
import json
import math
from collections.abc import Iterator, Mapping
from typing import Any
from urllib.parse import quote

import httpx
import numpy as np

from stepd import wire

from .errors import ServerError, TransportError, error_for_status
from .transport import Item, Registered, ServerTransport, StepItem, write_param

# Bodies above this go out in pieces of this size (see _Body).
CHUNK = 1 << 20
OCTET = {"content-type": wire.OCTET}
SAFETENSORS = {"content-type": wire.SAFETENSORS}


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
    return [arr.reshape(-1).data.cast("B")] if arr.size else [b""]


def _path(name: str) -> str:
    return quote(name, safe="")


def _detail(r: httpx.Response) -> Any:
    try:
        return r.json()["detail"]
    except (ValueError, KeyError, TypeError):
        return r.text


class HttpTransport(ServerTransport):
    """Talks to ``stepd serve``; ``timeout`` (seconds) bounds every request."""

    can_retry = True  # a fresh connection carries the same request again
    request_ids = True

    def __init__(self, url: str, token: str | None = None, timeout: float = 30.0) -> None:
        headers = {"user-agent": "stepd-client"}
        if token:
            headers["authorization"] = f"Bearer {token}"
        self.url = url.rstrip("/")
        self._worker_query: dict[str, str] = {}
        self._run = ""  # set by open_run: every later path is under /v1/runs/{run}
        self._http = httpx.Client(
            base_url=self.url,
            headers=headers,
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
        )

    # -- plumbing ---------------------------------------------------------------------------

    def request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        """One request; error statuses raise ``ServerError`` subclasses with the detail."""
        try:
            r = self._http.request(method, path, **kw)
        except httpx.HTTPError as exc:  # connect/read/write errors, timeouts, protocol
            raise TransportError(f"{method} {self.url}{path}: {exc!r}") from exc
        if r.is_success:
            return r
        raise error_for_status(r.status_code, _detail(r), method, path)

    def _json(self, method: str, path: str, **kw: Any) -> Any:
        r = self.request(method, path, **kw)
        try:
            return r.json()
        except ValueError as exc:
            raise TransportError(f"{method} {path}: reply is not JSON") from exc

    def _tensor(self, path: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
        """GET a raw float32 tensor; its shape from ``X-Stepd-Shape`` unless given."""
        r = self.request("GET", path)
        if shape is None:
            header = r.headers.get(wire.SHAPE_HEADER, "")
            shape = tuple(int(d) for d in header.split(",")) if header else ()
        if len(r.content) != math.prod(shape) * 4:
            raise TransportError(
                f"GET {path}: {len(r.content)} bytes, shape {list(shape)} needs "
                f"{math.prod(shape) * 4}"
            )
        return np.frombuffer(r.content, dtype=wire.F32).reshape(shape)

    def _slot(self, path: str) -> np.ndarray:
        """GET a state slot as safetensors, which says its dtype (8-bit state: uint8 codes)."""
        r = self.request("GET", path, params={"format": "safetensors"})
        try:
            tensors, _ = wire.parse(r.content, codes=wire.STATE_CODES)
        except wire.WireError as exc:
            raise TransportError(f"GET {path}: {exc}") from None
        if len(tensors) != 1:
            raise TransportError(f"GET {path}: {len(tensors)} tensors, expected 1")
        return np.array(next(iter(tensors.values())))

    def _p(self, rest: str = "") -> str:
        return f"/v1/runs/{self._run}{rest}"

    def status(self) -> dict[str, Any]:
        """``GET /v1/status``: the server as a whole."""
        return self._json("GET", "/v1/status")

    def close(self, delete_run: bool = False) -> None:
        if delete_run and self._run:
            with contextlib.suppress(TransportError, ServerError):  # else the server reaps it
                self.request("DELETE", self._p())
        self._http.close()

    # -- requests ---------------------------------------------------------------------------

    def open_run(
        self, run: str | None, fresh: bool, worker: str | None, group: Mapping[str, Any]
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"fresh": fresh, "group": dict(group)}
        if run is not None:
            body["name"] = run
        info = self._json("POST", "/v1/runs", json=body)
        self._run = _path(info["name"])
        self._worker_query = {"worker": worker} if worker is not None else {}
        return {**info, "run": info["name"]}

    def register(
        self,
        name: str,
        shape: tuple[int, ...],
        param: np.ndarray,
        group: Mapping[str, Any],
        lr_scale: float,
        shard: tuple[int, int] | None,
    ) -> Registered:
        body: dict[str, Any] = {
            "name": name,
            "shape": list(shape),
            "group": dict(group),
            "lr_scale": lr_scale,
            # float32 master weights on the server, whatever the model's precision
            "value": base64.b64encode(wire.widen(np, param).tobytes()).decode("ascii"),
        }
        if shard is not None:
            body["shard"] = {"index": shard[0], "count": shard[1]}
        r = self.request("POST", self._p("/params"), json=body)
        info = r.json()
        if r.status_code == 200:  # already there with the same config: the server's copy wins
            value = self._tensor(self._p(f"/params/{_path(name)}/value"), shape)
            write_param(param, value)
        return Registered(r.status_code == 201, info["group"], int(info["version"]))

    def step(
        self,
        items: tuple[StepItem, ...],
        versions: Mapping[str, int] | None,
        request_id: str,
        last: bool = False,
    ) -> tuple[dict[str, int], tuple[str, ...]]:
        rid = {wire.REQUEST_ID_HEADER: request_id}
        marks = {"last": "true"} if last else {}
        if len(items) == 1:
            [(name, _, param, grad)] = items
            query: dict[str, Any] = {**self._worker_query, **marks}
            if versions is not None:
                query["version"] = versions[name]
            headers = {**OCTET, **rid}
            if grad.dtype != wire.F32:  # the model's precision on the wire: half the bytes
                headers[wire.DTYPE_HEADER] = wire.DTYPE_NAMES[grad.dtype]
            if param.dtype != grad.dtype:  # the reply comes in the param's precision
                query["return_dtype"] = wire.DTYPE_NAMES[param.dtype]
            r = self.request(
                "POST",
                self._p(f"/params/{_path(name)}/step"),
                **_content(_raw(grad), headers),
                params=query,
            )
            if len(r.content) != param.nbytes:
                raise TransportError(
                    f"step {name!r}: reply has {len(r.content)} bytes, expected {param.nbytes}"
                )
            np.copyto(param.reshape(-1), np.frombuffer(r.content, dtype=param.dtype))
            stale: tuple[str, ...] = (name,) if r.headers.get(wire.STALE_HEADER) == "true" else ()
            return {name: int(r.headers[wire.VERSION_HEADER])}, stale
        meta = None if versions is None else {"versions": json.dumps(dict(versions))}
        grads = {name: grad.reshape(shape) for name, shape, _, grad in items}
        query = {**self._worker_query, **marks}
        if any(p.dtype != g.dtype for _, _, p, g in items):  # each param in its precision
            kinds = {p.dtype for _, _, p, _ in items}
            query["return_dtype"] = wire.DTYPE_NAMES[kinds.pop() if len(kinds) == 1 else wire.F32]
        r = self.request(
            "POST",
            self._p("/step"),
            **_content(wire.dump_parts(grads, meta), {**SAFETENSORS, **rid}),
            params=query,
        )
        try:
            out, reply_meta = wire.parse(r.content, codes=wire.GRAD_CODES)
            new = {k: int(v) for k, v in json.loads(reply_meta.get("versions", "{}")).items()}
            stale = tuple(str(n) for n in json.loads(reply_meta.get("stale", "[]")))
        except (ValueError, KeyError, TypeError) as exc:
            raise TransportError(f"POST /step: malformed safetensors reply: {exc}") from exc
        self._write_params("POST /step", items, out)
        return new, stale

    def pull(self, items: tuple[Item, ...]) -> dict[str, int]:
        names = [name for name, *_ in items]
        r = self.request("POST", self._p("/pull"), json={"names": names})
        try:
            out, meta = wire.parse(r.content)
            versions = json.loads(meta["versions"])
            new = {name: int(versions[name]) for name in names}
        except (ValueError, KeyError, TypeError) as exc:
            raise TransportError(f"POST /pull: malformed safetensors reply: {exc}") from exc
        self._write_params("POST /pull", items, out)
        return new

    @staticmethod
    def _write_params(
        what: str, items: tuple[Item, ...] | tuple[StepItem, ...], out: Mapping[str, np.ndarray]
    ) -> None:
        """Each reply tensor into its param, once all are checked (a bad reply writes none)."""
        for name, _, param, _ in items:
            got = out.get(name)
            if got is None or got.size != param.size:
                raise TransportError(f"{what}: reply lacks a matching {name!r}")
        for name, _, param, _ in items:
            write_param(param, out[name])

    def end_iteration(self) -> int:
        r = self._json("POST", self._p("/iteration/end"), params=self._worker_query)
        self.last_dropped = tuple(r.get("dropped") or ())
        return int(r["global_step"])

    def membership(self, action: str) -> dict[str, Any]:
        worker = _path(self._worker_query["worker"])
        return self._json("POST", self._p(f"/workers/{worker}/{action}"))

    def set_lr(self, group: str, lr: float) -> None:
        self.request("PUT", self._p("/lr"), json={"lr": lr, "group": group})

    def set_value(self, name: str, value: np.ndarray) -> None:
        path = self._p(f"/params/{_path(name)}/value")
        self.request("PUT", path, **_content(_raw(wire.widen(np, value)), OCTET))

    def set_hyperparams(self, group: str, changes: Mapping[str, Any]) -> dict[str, Any]:
        path = self._p(f"/groups/{_path(group)}/hyperparams")
        return self._json("PATCH", path, json=dict(changes))

    def group(self, group: str) -> dict[str, Any]:
        for g in self._json("GET", self._p("/groups")):
            if g["id"] == group:
                return g
        raise TransportError(f"the run has no group {group!r}")

    def lr_scale(self, name: str) -> float:
        return float(self._json("GET", self._p(f"/params/{_path(name)}/lr_scale"))["lr_scale"])

    def set_lr_scale(self, name: str, scale: float) -> None:
        self.request("PUT", self._p(f"/params/{_path(name)}/lr_scale"), json={"lr_scale": scale})

    def update_hessian(self, name: str, hessian: np.ndarray) -> None:
        path = self._p(f"/params/{_path(name)}/hessian")
        self.request("POST", path, **_content(_raw(hessian), OCTET))

    def load_state(self, group: str, body: bytes) -> None:
        path = self._p(f"/groups/{_path(group)}/state")
        self.request("PUT", path, **_content([body], SAFETENSORS))

    def global_step(self) -> int:
        return int(self._json("GET", self._p())["global_step"])

    def group_state(self, group: str) -> dict[str, Any]:
        """Assembled from the run, its params, per-param stats and raw slot downloads; not
        atomic: take it between steps."""
        run = self._json("GET", self._p())
        info = next((g for g in run["groups"] if g["id"] == group), None)
        if info is None:
            raise TransportError(f"the run has no group {group!r}")
        lr_scales: dict[str, float] = {}
        state: dict[str, Any] = {}
        for p in self._json("GET", self._p("/params")):
            if p["group"] != group:
                continue
            name = p["name"]
            lr_scales[name] = float(p["lr_scale"])
            stats = self._json("GET", self._p(f"/params/{_path(name)}/stats"))
            if stats.get("count") is None:
                continue  # never stepped (nor loaded): no state yet, as in process
            slots = {
                slot: self._slot(self._p(f"/params/{_path(name)}/state/{_path(slot)}"))
                for slot in stats["slots"]
            }
            state[name] = {"shape": list(p["shape"]), "count": stats["count"], "slots": slots}
        return {
            "algorithm": info["algorithm"],
            "hyperparams": info.get("current_hyperparams", info["hyperparams"]),
            "global_step": int(run["global_step"]),
            "lr": float(info["lr"]),
            "lr_scales": lr_scales,
            "state": state,
        }
