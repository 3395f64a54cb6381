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

A segment is an anonymous memory file (``memfd_create``), sealed against shrinking and
growing before its descriptor is passed to the server over the socket (``SCM_RIGHTS``): no
process can pull memory from under the server's mapping (which would kill it with SIGBUS),
no other connection can name it, and nothing lives in ``/dev/shm`` — the memory goes when
the last mapping does, whoever crashed. A segment of 2 MiB or more goes on huge pages where
the host allows (:mod:`stepd.hugepages`); :meth:`ShmTransport.pages` tells which.

The connection's first message, ``HELLO``, binds it to its run (a named one, or an anonymous
one the server deletes when the connection closes). The policy — registration, the
server's-copy-wins rule, ``load_state_dict`` — is the session's (:mod:`stepd.client.session`);
the state travels as one ``LOAD_STATE`` message. Unlike http://, nothing is ever resent (a
connection that failed is closed for good). A step that fails leaves ``param`` exactly as it
was. ``update_hessian`` (Sophia) copies the estimate into the name's segment, where a
gradient goes, and sends ``HESSIAN``. The wire format is :mod:`stepd.wire`'s.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import math
import mmap
import os
import secrets
import socket
import struct
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from stepd import hugepages
from stepd.wire import (
    F32,
    F64,
    HEADER,
    SLOT_VERSION,
    ST_DTYPES,
    STEP_REPLY,
    STEP_STALE,
    U32,
    U64,
    Op,
    widen,
)

from .errors import TransportError, error_for_status
from .transport import Item, Registered, ServerTransport, StepItem, write_param

PREFIX = "stepd-"  # memfd names: labels only, seen in /proc/<pid>/maps
SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW  # what the server insists on

_counter = itertools.count()


def _state_array(data: memoryview, spec: dict[str, Any]) -> np.ndarray:
    """One slot of a STATE reply: float32, or uint8 (8-bit state's codes) as ``dtype`` says."""
    dtype = ST_DTYPES[spec.get("dtype", "F32")]
    return np.frombuffer(data, dtype, spec["bytes"] // dtype.itemsize, spec["offset"])


@dataclass
class _Segment:
    name: str
    mm: mmap.mmap
    param: np.ndarray  # views of the segment: the param, then the gradient
    grad: np.ndarray
    slot: int
    user: tuple[np.ndarray, np.ndarray] | None = None  # the arrays buffers() handed out
    pages: str = hugepages.SMALL  # the page mode of the server's mapping (stepd.hugepages)


class ShmTransport(ServerTransport):
    """Talks to ``stepd serve --shm-socket PATH`` on this host."""

    def __init__(self, path: str, timeout: float = 30.0, token: str | None = None) -> None:
        """``token``: the server's bearer token, shown once in ``HELLO``."""
        self.path = path
        self._bearer = token
        self.url = f"shm://{path}"
        self._pid = os.getpid()
        self._token = f"{self._pid}-{secrets.token_hex(4)}"
        self._segments: dict[str, _Segment] = {}
        self._lock = threading.Lock()  # one message in flight per connection
        self._closed = False
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        deadline = time.monotonic() + timeout
        while True:
            try:
                sock.connect(path)
                break
            except BlockingIOError as exc:  # the server's backlog is full: wait our turn
                if time.monotonic() >= deadline:
                    sock.close()
                    raise TransportError(f"shm://{path}: cannot connect: {exc!r}") from exc
                time.sleep(0.01)
            except OSError as exc:
                sock.close()
                raise TransportError(f"shm://{path}: cannot connect: {exc!r}") from exc
        self._sock = sock
        self._rbuf = bytearray(1 << 16)
        self._rview = memoryview(self._rbuf)

    # -- plumbing ---------------------------------------------------------------------------

    def request(self, op: int, payload: bytes = b"", fds: Sequence[int] = ()) -> bytes:
        """One control message (``fds``: file descriptors passed along, ``SCM_RIGHTS``);
        error statuses raise ``ServerError`` subclasses."""
        if self._closed:
            raise TransportError(f"shm://{self.path}: the connection is closed")
        with self._lock:
            try:
                message = HEADER.pack(op, 0, len(payload)) + payload
                if fds:
                    sent = socket.send_fds(self._sock, [message], list(fds))
                    if sent < len(message):
                        self._sock.sendall(message[sent:])
                else:
                    self._sock.sendall(message)
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
                raise TransportError(f"shm://{self.path} {_op_name(op)}: {exc!r}") from exc
        if status != 200:
            detail = body.decode(errors="replace")
            raise error_for_status(status, detail, "shm", _op_name(op))
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
        self.request(Op.PING)

    def close(self, delete_run: bool = False) -> None:
        """An anonymous run is the connection's own: the server deletes it as it closes."""
        if not self._closed:
            with contextlib.suppress(Exception):  # a server that is gone frees nothing
                self.request(Op.CLOSE)
            self._closed = True
            self._sock.close()
        self._unmap_segments()

    def _unmap_segments(self) -> None:
        segments, self._segments = self._segments, {}
        for seg in segments.values():
            seg.param = seg.grad = None  # type: ignore[assignment]
            with contextlib.suppress(BufferError):  # a buffers() view still in use
                seg.mm.close()

    # -- requests ---------------------------------------------------------------------------

    def open_run(
        self, run: str | None, fresh: bool, worker: str | None, group: Mapping[str, Any]
    ) -> dict[str, Any]:
        hello = {"run": run, "fresh": fresh, "worker": worker, "group": dict(group)}
        if self._bearer is not None:
            hello["token"] = self._bearer
        try:
            return json.loads(self.request(Op.HELLO, json.dumps(hello).encode()))
        except BaseException:
            self.close()
            raise

    def register(
        self,
        name: str,
        shape: tuple[int, ...],
        param: np.ndarray,
        group: Mapping[str, Any],
        lr_scale: float,
        shard: tuple[int, int] | None,
    ) -> Registered:
        """Create, attach and register the name's segment (the value goes in it first)."""
        size = math.prod(shape)
        nbytes = max(8 * size, 8)  # mmap cannot map zero bytes
        seg_name = f"{PREFIX}{self._token}-{next(_counter)}"
        # An anonymous memory file, sealed before the server sees it: nobody can shrink (or
        # grow) memory the server has mapped, and nothing is left in /dev/shm by a crash.
        # On huge pages where the host allows (stepd.hugepages).
        fd, mapped = hugepages.create_segment(seg_name, nbytes, SEALS | fcntl.F_SEAL_SEAL)
        mm, at = mapped.mm, mapped.offset
        seg = _Segment(
            seg_name,
            mm,
            np.frombuffer(mm, F32, size, at),
            np.frombuffer(mm, F32, size, at + 4 * size),
            -1,
        )
        try:
            np.copyto(seg.param, widen(np, param).reshape(-1))  # the float32 master weights
            meta = {"segment": seg_name, "bytes": nbytes}
            handle = U32.unpack(self.request(Op.ATTACH, json.dumps(meta).encode(), [fd]))[0]
            body = {
                "name": name,
                "shape": list(shape),
                "group": dict(group),
                "lr_scale": lr_scale,
                "segment": handle,
                "shard": None if shard is None else list(shard),
            }
            reply = json.loads(self.request(Op.REGISTER, json.dumps(body).encode()))
        except BaseException:
            seg.param = seg.grad = None  # type: ignore[assignment]
            mm.close()
            raise
        finally:
            os.close(fd)  # the mappings (ours, the server's) keep the memory
        seg.slot = int(reply["slot"])
        seg.pages = str(reply.get("pages", hugepages.SMALL))  # servers before it: 4 KiB pages
        self._segments[name] = seg
        if not reply["created"] and not np.shares_memory(seg.param, param):
            write_param(param, seg.param)  # the server's copy wins
        return Registered(bool(reply["created"]), reply["group"], int(reply["version"]))

    def buffers(self, name: str, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
        """``(param, grad)`` arrays in the registered name's segment (see
        :meth:`stepd.client.StepdOptimizer.buffers`)."""
        seg = self._segments[name]
        if seg.user is None:
            seg.user = (seg.param.reshape(shape), seg.grad.reshape(shape))
        return seg.user

    def pages(self, name: str) -> str:
        """The page mode the server maps the registered name's segment with: ``thp`` (2 MiB
        transparent huge pages) or ``4k`` (see :mod:`stepd.hugepages`)."""
        return self._segments[name].pages

    def step(
        self,
        items: tuple[StepItem, ...],
        versions: Mapping[str, int] | None,
        request_id: str,
        last: bool = False,
    ) -> tuple[dict[str, int], tuple[str, ...]]:
        segs = self._segments
        if len(items) == 1 and versions is None and not last:  # the latency path
            ((name, _, param, grad),) = items
            seg = segs[name]
            user = seg.user
            if user is None or grad is not user[1]:
                np.copyto(seg.grad, widen(np, grad).reshape(-1))
            reply = self.request(Op.STEP, U32.pack(seg.slot))
            if len(reply) != STEP_REPLY.size:
                raise TransportError(f"shm://{self.path}: malformed step reply")
            if user is None or param is not user[0]:
                write_param(param, seg.param)
            return {name: STEP_REPLY.unpack(reply)[0]}, ()  # no versions: never stale
        chosen = [segs[name] for name, *_ in items]
        for seg, (_, _, _, grad) in zip(chosen, items, strict=True):
            if seg.user is None or grad is not seg.user[1]:
                np.copyto(seg.grad, widen(np, grad).reshape(-1))
        count = len(chosen)
        if versions is not None:
            payload = U32.pack(count) + b"".join(
                SLOT_VERSION.pack(seg.slot, versions[name])
                for seg, (name, *_) in zip(chosen, items, strict=True)
            )
            reply = self.request(Op.STEP_V, payload)
        else:
            payload = U32.pack(count) + struct.pack(f"<{count}I", *(s.slot for s in chosen))
            reply = self.request(Op.STEP_LAST if last else Op.STEP_BATCH, payload)
        if len(reply) != STEP_REPLY.size * count:
            raise TransportError(f"shm://{self.path}: malformed step reply")
        for seg, (_, _, param, _) in zip(chosen, items, strict=True):
            if seg.user is None or param is not seg.user[0]:
                write_param(param, seg.param)
        replies = [STEP_REPLY.unpack_from(reply, k * STEP_REPLY.size) for k in range(count)]
        new = {name: version for (name, *_), (version, _) in zip(items, replies, strict=True)}
        stale = tuple(
            name
            for (name, *_), (_, outcome) in zip(items, replies, strict=True)
            if outcome == STEP_STALE
        )
        return new, stale

    def pull(self, items: tuple[Item, ...]) -> dict[str, int]:
        """The server writes each current value into the segment's param half (where a
        step's new value goes), then it is copied into ``param``."""
        chosen = [self._segments[name] for name, *_ in items]
        count = len(chosen)
        payload = U32.pack(count) + struct.pack(f"<{count}I", *(s.slot for s in chosen))
        reply = self.request(Op.PULL, payload)
        if len(reply) != 8 * count:
            raise TransportError(f"shm://{self.path}: malformed pull reply")
        for seg, (_, _, param, _) in zip(chosen, items, strict=True):
            if seg.user is None or param is not seg.user[0]:
                write_param(param, seg.param)
        versions = struct.unpack(f"<{count}Q", reply)
        return {name: v for (name, *_), v in zip(items, versions, strict=True)}

    def end_iteration(self) -> int:
        reply = self.request(Op.END_ITERATION)
        self.last_dropped = tuple(json.loads(reply[8:])["dropped"]) if len(reply) > 8 else ()
        return U64.unpack_from(reply)[0]

    def membership(self, action: str) -> dict[str, Any]:
        ops = {"join": Op.JOIN, "leave": Op.LEAVE, "heartbeat": Op.HEARTBEAT}
        return json.loads(self.request(ops[action]))

    def set_lr(self, group: str, lr: float) -> None:
        self.request(Op.SET_LR, F64.pack(lr) + group.encode())

    def set_value(self, name: str, value: np.ndarray) -> None:
        seg = self._segments[name]
        np.copyto(seg.grad, widen(np, value).reshape(-1))  # read from where a gradient goes
        self.request(Op.SET_VALUE, U32.pack(seg.slot))

    def set_hyperparams(self, group: str, changes: Mapping[str, Any]) -> dict[str, Any]:
        body = json.dumps({"group": group, "changes": dict(changes)}).encode()
        return json.loads(self.request(Op.SET_HYPERPARAMS, body))

    def group(self, group: str) -> dict[str, Any]:
        return json.loads(self.request(Op.GET_GROUP, group.encode()))

    def lr_scale(self, name: str) -> float:
        return F64.unpack(self.request(Op.GET_LR_SCALE, name.encode()))[0]

    def set_lr_scale(self, name: str, scale: float) -> None:
        self.request(Op.SET_LR_SCALE, F64.pack(scale) + name.encode())

    def update_hessian(self, name: str, hessian: np.ndarray) -> None:
        """The estimate goes into the segment's gradient half, as a gradient would."""
        seg = self._segments[name]
        if seg.user is None or hessian is not seg.user[1]:
            np.copyto(seg.grad, hessian.reshape(-1))
        self.request(Op.HESSIAN, U32.pack(seg.slot))

    def load_state(self, group: str, body: bytes) -> None:
        gid = group.encode()
        self.request(Op.LOAD_STATE, U32.pack(len(gid)) + gid + body)

    def _state_head(self, group: bytes) -> tuple[dict[str, Any], memoryview]:
        raw = self.request(Op.STATE, group)
        n = U32.unpack_from(raw)[0]
        return json.loads(raw[4 : 4 + n]), memoryview(raw)[4 + n :]

    def global_step(self) -> int:
        return int(self._state_head(b"")[0]["global_step"])

    def group_state(self, group: str) -> dict[str, Any]:
        head, data = self._state_head(group.encode())
        state = {}
        for name, st in head["state"].items():
            slots = {
                slot: _state_array(data, s).reshape(s["shape"]).copy()
                for slot, s in st["slots"].items()
            }
            state[name] = {"shape": st["shape"], "count": st["count"], "slots": slots}
        return {
            "algorithm": head["algorithm"],
            "hyperparams": head["hyperparams"],
            "global_step": int(head["global_step"]),
            "lr": float(head["lr"]),
            "lr_scales": {n: float(v) for n, v in head["lr_scales"].items()},
            "state": state,
        }


def _op_name(op: int) -> str:
    try:
        return Op(op).name
    except ValueError:
        return str(op)
