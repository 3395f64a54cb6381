"""``shm:///path/to/stepd.sock``: same host, tensors in POSIX shared memory.

Each parameter gets one segment, created here (``/dev/shm/stepd-<pid>-<token>-<n>``,
``O_CREAT | O_EXCL``, mode 0600) the first time the name is registered, sized once (the
param's float32 bytes, then the gradient's) and reused on every step. A step copies the
gradient into the segment, sends an 8+4-byte control message over the Unix socket that
``stepd serve --shm-socket PATH`` listens on, and the server's kernel reads the gradient
where it lies and writes the new parameter back into the segment, which is then copied
into ``param``: no tensor byte crosses the socket. Arrays from :meth:`ShmTransport.buffers`
live in the segment itself, and steps with them copy nothing at all.

The first client to register a name (outside sync groups) lends its segment to the server
as the parameter's storage: the kernel updates it in place, so nothing is copied after a
step, and a ``buffers()`` param array *is* the server's value (writing to it changes the
parameter, as writing to a model's tensor does in process). When that client leaves, the
server moves the value back into its own memory; nothing is lost if the client crashes.

Segments are unlinked by :meth:`close`, at interpreter exit (``atexit``) and by the server
when it sees the socket close (a crashed client included). ``multiprocessing.shared_memory``
is not used: its resource tracker unlinks and warns at the wrong times.

Registration, the server's-copy-wins rule and ``load_state_dict`` (uploads now or right
after a name registers) are those of :mod:`stepd.client.http`; the state travels as the same
safetensors in one ``LOAD_STATE`` message, up to the server's body limit
(``STEPD_MAX_BODY_BYTES``, 1 GiB by default; a larger state is a ``ValueError`` before
sending). Unlike
http://, steps are never retried (a connection that failed is closed for good). A step that
fails leaves ``param`` exactly as it was. ``update_hessian`` (Sophia) copies the estimate
into the name's segment, where a gradient goes, and sends ``HESSIAN``. The wire format is
described in ``service/shm.py``.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import json
import math
import mmap
import os
import secrets
import socket
import struct
import threading
import weakref
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

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

HEADER = struct.Struct("<HHI")
U32 = struct.Struct("<I")
U64 = struct.Struct("<Q")
F64 = struct.Struct("<d")
STEP_REPLY = struct.Struct("<QB")
SLOT_VERSION = struct.Struct("<IQ")
F32 = np.dtype("<f4")
SHM_DIR = "/dev/shm"
PREFIX = "stepd-"

# ops (service/shm.py)
ATTACH, REGISTER, STEP, STEP_BATCH, END_ITERATION, SET_LR = 1, 2, 3, 4, 5, 6
GET_LR_SCALE, SET_LR_SCALE, GET_GROUP, STATE, CLOSE, PING = 7, 8, 9, 10, 11, 12
HELLO, STEP_V, LOAD_STATE = 13, 14, 15
HESSIAN = 16
MAX_STATE_BYTES = 1 << 30  # the server's default limit on a LOAD_STATE message
OP_NAMES = {
    v: k
    for k, v in dict(
        ATTACH=1, REGISTER=2, STEP=3, STEP_BATCH=4, END_ITERATION=5, SET_LR=6,
        GET_LR_SCALE=7, SET_LR_SCALE=8, GET_GROUP=9, STATE=10, CLOSE=11, PING=12,
        HELLO=13, STEP_V=14, LOAD_STATE=15, HESSIAN=16,
    ).items()
}  # fmt: skip

_live: weakref.WeakSet[ShmTransport] = weakref.WeakSet()
_counter = itertools.count()


@atexit.register
def _unlink_all() -> None:  # interpreter exit: no segment outlives this process
    for t in list(_live):
        if t._pid == os.getpid():  # a forked child must not unlink its parent's segments
            t._unlink_segments()


@dataclass
class _Segment:
    name: str
    mm: mmap.mmap
    param: np.ndarray  # views of the segment: the param, then the gradient
    grad: np.ndarray
    slot: int
    user: tuple[np.ndarray, np.ndarray] | None = None  # the arrays buffers() handed out


class ShmTransport(StateUploads, Transport):
    """Talks to ``stepd serve --shm-socket PATH`` on this host."""

    def __init__(
        self,
        path: str,
        algorithm: str,
        hyperparams: Mapping[str, Any],
        timeout: float = 30.0,
        worker: str | None = None,
        workers: Mapping[str, Any] | None = None,
    ) -> None:
        """``worker``: this process's id, sent once per connection (``HELLO``); sync groups
        need it. ``workers``: the group's workers config, as for :mod:`stepd.client.http`
        (``{"mode": "sync", "count": 4}``, ``{"mode": "async", "max_staleness": 8}``)."""
        self.path = path
        self._group_spec: dict[str, Any] = {
            "algorithm": algorithm,
            "hyperparams": dict(hyperparams),
        }
        if workers is not None:
            self._group_spec["workers"] = dict(workers)
        self._async = workers is not None and workers.get("mode") == "async"
        self._versions: dict[str, int] = {}  # async groups: the version each param came from
        self._algorithm = algorithm
        self._hyperparams = dict(hyperparams)
        self._pid = os.getpid()
        self._token = f"{self._pid}-{secrets.token_hex(4)}"
        self._segments: dict[str, _Segment] = {}
        self._group_id: str | None = None
        self._lr: float | None = None
        self._pending_scales: dict[str, float] = {}
        self._explicit_scales: set[str] = set()
        self._pending_load: StateLoad | None = None  # load_state_dict not fully uploaded yet
        self._lock = threading.Lock()  # one message in flight per connection
        self._closed = False
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except OSError as exc:
            sock.close()
            raise TransportError(f"shm://{path}: cannot connect: {exc!r}") from exc
        self._sock = sock
        self._rbuf = bytearray(1 << 16)
        self._rview = memoryview(self._rbuf)
        _live.add(self)
        if worker is not None:
            try:
                self.request(HELLO, json.dumps({"worker": worker}).encode())
            except BaseException:
                self.close()
                raise

    # -- plumbing ---------------------------------------------------------------------------

    def request(self, op: int, payload: bytes = b"") -> bytes:
        """One control message; error statuses raise ``ServerError`` subclasses."""
        if self._closed:
            raise TransportError(f"shm://{self.path}: the connection is closed")
        with self._lock:
            try:
                self._sock.sendall(HEADER.pack(op, 0, len(payload)) + payload)
                buf, view = self._rbuf, self._rview
                got = 0
                while got < HEADER.size:  # header and a small reply usually come in one read
                    k = self._sock.recv_into(view[got:])
                    if k == 0:
                        raise ConnectionResetError("the server closed the connection")
                    got += k
                status, _, n = HEADER.unpack_from(buf)
                end = HEADER.size + n
                if end <= len(buf):
                    while got < end:
                        k = self._sock.recv_into(view[got:end])
                        if k == 0:
                            raise ConnectionResetError("the server closed the connection")
                        got += k
                    body = bytes(view[HEADER.size : end])
                else:  # a large reply (state_dict): read it into its own buffer
                    big = bytearray(n)
                    have = got - HEADER.size
                    big[:have] = view[HEADER.size : got]
                    self._recv_into(memoryview(big)[have:])
                    body = bytes(big)
            except OSError as exc:  # reset, broken pipe, timeout
                self._broken()
                what = OP_NAMES.get(op, op)
                raise TransportError(f"shm://{self.path} {what}: {exc!r}") from exc
        if status != 200:
            detail = body.decode(errors="replace")
            raise error_for_status(status, detail, "shm", OP_NAMES.get(op, str(op)))
        return body

    def _recv_into(self, view: memoryview) -> None:
        got = 0
        while got < len(view):
            k = self._sock.recv_into(view[got:])
            if k == 0:
                raise ConnectionResetError("the server closed the connection")
            got += k

    def _broken(self) -> None:
        """After a transport failure the stream may be out of step: never reuse it."""
        self._closed = True
        self._sock.close()

    def ping(self) -> None:
        self.request(PING)

    def close(self) -> None:
        if not self._closed:
            with contextlib.suppress(Exception):  # a server that is gone frees nothing
                self.request(CLOSE)
            self._closed = True
            self._sock.close()
        self._unlink_segments()
        _live.discard(self)

    def _unlink_segments(self) -> None:
        segments, self._segments = self._segments, {}
        for seg in segments.values():
            try:
                os.unlink(os.path.join(SHM_DIR, seg.name))
            except FileNotFoundError:  # the server unlinked it already
                pass
            except OSError:
                pass
            seg.param = seg.grad = None  # type: ignore[assignment]
            with contextlib.suppress(BufferError):  # a buffers() view still in use
                seg.mm.close()

    # -- ops --------------------------------------------------------------------------------

    def handle(self, op: Op) -> Any:
        match op:
            case Step(items=items):
                return self._step(items)
            case Register(items=items):
                for name, shape, param, _ in items:
                    self._segment(name, shape, param)
                if self._pending_load is not None:
                    self._upload_state(self._pending_load)
                return None
            case EndIteration():
                step = U64.unpack(self.request(END_ITERATION))[0]
                if self._pending_load is not None and self._pending_load.first:
                    return self._pending_load.advance()  # the loaded step, not uploaded yet
                return step
            case GetLr():
                if self._group_id is not None:
                    return float(self._group()["lr"])
                return self._lr if self._lr is not None else self._hyperparams.get("lr")
            case SetLr(lr=lr):
                if self._group_id is not None:
                    self.request(SET_LR, F64.pack(lr) + self._group_id.encode())
                self._lr = lr
                return None
            case GetLrScale(name=name):
                if name in self._segments or name not in self._pending_scales:
                    return F64.unpack(self.request(GET_LR_SCALE, name.encode()))[0]
                return self._pending_scales[name]
            case SetLrScale(name=name, scale=scale):
                if name in self._segments:
                    self.request(SET_LR_SCALE, F64.pack(scale) + name.encode())
                else:
                    self._pending_scales[name] = scale
                self._explicit_scales.add(name)
                return None
            case GetStateDict():
                sd = self._state_dict()
                if self._pending_load is None:
                    return sd
                return self._pending_load.overlay(sd, self._pending_scales)
            case UpdateHessian(name=name, hessian=hessian):
                return self._update_hessian(name, hessian)
            case LoadStateDict(state=state):
                return self._load_state(state)
        raise TypeError(f"unknown op {op!r}")

    def _registered_names(self) -> Collection[str]:
        return self._segments

    def _send_state(self, group_id: str, body: bytes) -> None:
        """``LOAD_STATE``: the group id, then the safetensors body."""
        gid = group_id.encode()
        payload = U32.pack(len(gid)) + gid + body
        if len(payload) > MAX_STATE_BYTES:
            raise ValueError(
                f"load_state_dict: {len(payload)} bytes of state exceed the {MAX_STATE_BYTES} "
                "bytes a server takes in one message by default (STEPD_MAX_BODY_BYTES)"
            )
        self.request(LOAD_STATE, payload)

    def buffers(
        self, name: str, shape: tuple[int, ...], init: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Register ``name`` (initial value ``init``) and return ``(param, grad)`` arrays that
        live in its segment: write the gradient into ``grad`` and pass both to ``step``, and
        the step copies nothing. Valid until :meth:`close`."""
        seg = self._segment(name, tuple(shape), np.ascontiguousarray(init, F32).reshape(-1))
        if self._pending_load is not None:
            self._upload_state(self._pending_load)
        if seg.user is None:
            seg.user = (seg.param.reshape(shape), seg.grad.reshape(shape))
        return seg.user

    def _segment(self, name: str, shape: tuple[int, ...], param: np.ndarray) -> _Segment:
        """The segment of ``name``, created, attached and registered on first use."""
        seg = self._segments.get(name)
        if seg is not None:
            return seg
        size = math.prod(shape)
        nbytes = max(8 * size, 8)  # mmap cannot map zero bytes
        seg_name = f"{PREFIX}{self._token}-{next(_counter)}"
        fd = os.open(
            os.path.join(SHM_DIR, seg_name),
            os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
        )
        try:
            os.fchmod(fd, 0o600)  # whatever the umask
            os.ftruncate(fd, nbytes)
            mm = mmap.mmap(fd, nbytes)
        except BaseException:
            os.close(fd)
            os.unlink(os.path.join(SHM_DIR, seg_name))
            raise
        os.close(fd)
        seg = _Segment(
            seg_name,
            mm,
            np.frombuffer(mm, F32, size, 0),
            np.frombuffer(mm, F32, size, 4 * size),
            -1,
        )
        try:
            np.copyto(seg.param, param.reshape(-1))
            meta = {"segment": seg_name, "bytes": nbytes}
            handle = U32.unpack(self.request(ATTACH, json.dumps(meta).encode()))[0]
            body = {
                "name": name,
                "shape": list(shape),
                "group": self._group_spec,
                "lr_scale": self._pending_scales.get(name, 1.0),
                "segment": handle,
            }
            reply = json.loads(self.request(REGISTER, json.dumps(body).encode()))
        except BaseException:
            seg.param = seg.grad = None  # type: ignore[assignment]
            mm.close()
            with contextlib.suppress(FileNotFoundError):  # no waiting for the server's
                os.unlink(os.path.join(SHM_DIR, seg_name))
            raise
        seg.slot = int(reply["slot"])
        if "version" in reply:
            self._versions[name] = int(reply["version"])
        if self._group_id is None:
            self._group_id = reply["group"]
            if self._lr is not None:  # set_lr came before the group existed
                self.request(SET_LR, F64.pack(self._lr) + self._group_id.encode())
        self._pending_scales.pop(name, None)
        self._segments[name] = seg
        if not reply["created"] and not np.shares_memory(seg.param, param):
            np.copyto(param.reshape(-1), seg.param)  # the server's copy wins
        return seg

    def _update_hessian(self, name: str, hessian: np.ndarray) -> None:
        """``HESSIAN``: the estimate goes into the segment's gradient half, as a gradient
        would, and the server reads it there."""
        seg = self._segments.get(name)
        if seg is None:
            raise ValueError(
                f"{name!r} is not registered on this shm:// connection: register or step it first"
            )
        if seg.user is None or hessian is not seg.user[1]:
            np.copyto(seg.grad, hessian.reshape(-1))
        self.request(HESSIAN, U32.pack(seg.slot))

    def _step(self, items: tuple[Item, ...]) -> None:
        segs = self._segments
        if len(items) == 1:  # the latency path: as little Python as possible
            ((name, shape, param, grad),) = items
            seg = segs.get(name) or self._segment(name, shape, param)
            if self._pending_load is not None:  # loaded state of a name registered just now
                self._upload_state(self._pending_load)
            user = seg.user
            if user is None or grad is not user[1]:
                np.copyto(seg.grad, grad.reshape(-1))
            if self._async:
                payload = U32.pack(1) + SLOT_VERSION.pack(seg.slot, self._versions[name])
                reply = self.request(STEP_V, payload)
            else:
                reply = self.request(STEP, U32.pack(seg.slot))
            if len(reply) != STEP_REPLY.size:
                raise TransportError(f"shm://{self.path}: malformed step reply")
            if self._async:
                self._versions[name] = STEP_REPLY.unpack(reply)[0]
            if user is None or param is not user[0]:
                np.copyto(param.reshape(-1), seg.param)
            return
        chosen = [segs.get(name) or self._segment(name, shape, p) for name, shape, p, _ in items]
        if self._pending_load is not None:
            self._upload_state(self._pending_load)
        for seg, (_, _, _, grad) in zip(chosen, items, strict=True):
            if seg.user is None or grad is not seg.user[1]:
                np.copyto(seg.grad, grad.reshape(-1))
        count = len(chosen)
        if self._async:
            payload = U32.pack(count) + b"".join(
                SLOT_VERSION.pack(seg.slot, self._versions[name])
                for seg, (name, *_) in zip(chosen, items, strict=True)
            )
            reply = self.request(STEP_V, payload)
        else:
            payload = U32.pack(count) + struct.pack(f"<{count}I", *(s.slot for s in chosen))
            reply = self.request(STEP_BATCH, payload)
        if len(reply) != STEP_REPLY.size * count:
            raise TransportError(f"shm://{self.path}: malformed step reply")
        if self._async:
            for k, (name, *_) in enumerate(items):
                self._versions[name] = STEP_REPLY.unpack_from(reply, k * STEP_REPLY.size)[0]
        for seg, (_, _, param, _) in zip(chosen, items, strict=True):
            if seg.user is None or param is not seg.user[0]:
                np.copyto(param.reshape(-1), seg.param)

    def _group(self) -> dict[str, Any]:
        assert self._group_id is not None
        return json.loads(self.request(GET_GROUP, self._group_id.encode()))

    def _state_head(self, group: bytes) -> tuple[dict[str, Any], memoryview]:
        raw = self.request(STATE, group)
        n = U32.unpack_from(raw)[0]
        return json.loads(raw[4 : 4 + n]), memoryview(raw)[4 + n :]

    def _state_dict(self) -> dict[str, Any]:
        if self._group_id is None:  # nothing registered yet: what connect() was given
            lr = self._lr if self._lr is not None else self._hyperparams.get("lr")
            return {
                "algorithm": self._algorithm,
                "hyperparams": json.loads(json.dumps(self._hyperparams)),
                "global_step": int(self._state_head(b"")[0]["global_step"]),
                "lr": lr,
                "lr_scales": dict(self._pending_scales),
                "state": {},
            }
        head, data = self._state_head(self._group_id.encode())
        state = {}
        for name, st in head["state"].items():
            slots = {
                slot: np.frombuffer(data, F32, s["bytes"] // 4, s["offset"])
                .reshape(s["shape"])
                .copy()
                for slot, s in st["slots"].items()
            }
            state[name] = {"shape": st["shape"], "count": st["count"], "slots": slots}
        lr_scales = {
            n: float(s)
            for n, s in head["lr_scales"].items()
            if s != 1.0 or n in self._explicit_scales
        }
        return {
            "algorithm": head["algorithm"],
            "hyperparams": head["hyperparams"],
            "global_step": int(head["global_step"]),
            "lr": float(head["lr"]),
            "lr_scales": lr_scales,
            "state": state,
        }
