"""The shared-memory data plane: a Unix-domain-socket listener next to the HTTP API.

Same host only. A client (:mod:`stepd.client.shm`) creates one POSIX shared-memory segment per
parameter (``/dev/shm/stepd-…``, mode 0600, sized once: the parameter's float32 bytes, then
the gradient's), and sends small binary control messages over the socket; the server maps
the segment, reads the gradient where the client wrote it (a zero-copy numpy view) and
writes the updated parameter back into the segment. No tensor bytes cross the socket on a
step. Every op talks to the same :class:`ParamStore` as HTTP, so the inspection API sees
shm steps. On a CPU store, the segment of the connection that registers a name first
(outside sync groups) becomes the parameter's storage (:meth:`ParamStore.adopt`): the kernel
updates it in place and no copy follows the step; other connections get copies. When that
connection closes, the value moves back into the store's memory (``ParamStore.release``)
before the segment is unmapped.

Wire format (little-endian). A request is ``struct "<HHI"`` (op, 0, payload length) and
its payload; a reply is ``"<HHI"`` (status, 0, payload length) and its payload. ``status``
uses the HTTP API's codes: 200 ok, 404 ``NotFound``, 409 ``Conflict``, 422 ``Invalid``,
400 a malformed message, 500 anything else; an error's payload is the store's message
(UTF-8). JSON appears only in rare metadata (attach, register, group, state); steps are
``struct``-packed ids. ``LOAD_STATE`` carries a safetensors body (a client's
``load_state_dict``), the same bytes and rules as HTTP's ``PUT /v1/groups/{id}/state``, up
to the same limit (``STEPD_MAX_BODY_BYTES``); every other message stays within
``MAX_PAYLOAD``. No pickle, ever.

Sophia's Hessian estimate (``HESSIAN``, like HTTP's ``POST /v1/params/{name}/hessian``)
travels like a gradient: the client writes it into the segment's gradient half and sends the
slot; the store folds it in from there.

Distributed workers (service/workers.py) work as over HTTP. The worker id belongs to the
connection: ``HELLO`` (JSON ``{"worker": id}``, validated like HTTP's ``?worker=``) names it,
once, before its steps. A group's ``workers`` config travels in REGISTER's group JSON. A step
of a sync-group name blocks in the connection's thread until its round completes (a straggler
timeout is a 504); an async-group name must be stepped with ``STEP_V``, which carries the
parameter version each gradient was computed from (a stale one is a 409, nothing applied).
``END_ITERATION`` on a connection with a worker id, when the server has sync groups, is the
barrier of :meth:`SyncRounds.end_iteration`.

When a connection closes (``CLOSE``, a clean exit or a client crash), the server drops its
views, unmaps and unlinks every segment that connection attached, and only those.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import mmap
import os
import re
import socket
import stat
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .api.dataplane import WORKER_RE
from .store import Conflict, Invalid, NotFound, ParamStore, StepOutcome
from .tensors import BadTensor, parse_safetensors
from .workers import StragglerTimeout

log = logging.getLogger("stepd.shm")

HEADER = struct.Struct("<HHI")
U32 = struct.Struct("<I")
U64 = struct.Struct("<Q")
F64 = struct.Struct("<d")
STEP_REPLY = struct.Struct("<QB")  # version, applied
MAX_PAYLOAD = 64 << 20  # control messages are small; a batch of 16M ids at most

# ops
ATTACH = 1  # JSON {"segment": name, "bytes": n} -> u32 segment handle
REGISTER = 2  # JSON {name, shape, group, lr_scale, segment} -> JSON {created, group, slot, version}
STEP = 3  # u32 slot -> u64 version, u8 applied
STEP_BATCH = 4  # u32 n, n x u32 slot -> n x (u64 version, u8 applied)
END_ITERATION = 5  # -> u64 global step
SET_LR = 6  # f64 lr, UTF-8 group id -> nothing
GET_LR_SCALE = 7  # UTF-8 name -> f64
SET_LR_SCALE = 8  # f64 scale, UTF-8 name -> nothing
GET_GROUP = 9  # UTF-8 group id -> JSON group info (with "lr")
STATE = 10  # UTF-8 group id ("": global step only) -> u32 n, JSON (n bytes), raw slots
CLOSE = 11  # -> nothing; the server then detaches everything and closes
PING = 12  # -> nothing (a bare round trip)
HELLO = 13  # JSON {"worker": id} -> nothing; names this connection's worker, once
STEP_V = 14  # u32 n, n x (u32 slot, u64 based_on version) -> n x (u64 version, u8 applied)
LOAD_STATE = 15  # u32 k, group id (k bytes UTF-8), safetensors (PUT /v1/groups/{id}/state's)
HESSIAN = 16  # u32 slot -> nothing; Sophia's Hessian estimate, in the segment's gradient half
SLOT_VERSION = struct.Struct("<IQ")

OK, BAD, NOT_FOUND, CONFLICT, INVALID, INTERNAL, TIMEOUT = 200, 400, 404, 409, 422, 500, 504
SEGMENT_RE = re.compile(r"^stepd-[A-Za-z0-9_.\-]{1,200}$")
SHM_DIR = Path("/dev/shm")
F32 = np.dtype("<f4")


class ProtocolError(Exception):
    """A malformed message (400): the connection stays usable."""


@dataclass
class Segment:
    name: str
    mm: mmap.mmap
    size: int
    pinned: int | None = None  # host address registered with CUDA, if any


@dataclass
class Slot:
    name: str  # the parameter
    param: np.ndarray  # views into the segment
    grad: np.ndarray
    adopted: bool = False  # the store keeps the parameter in ``param`` (ParamStore.adopt)


@dataclass(eq=False)  # hashable by identity: kept in a set
class Connection:
    sock: socket.socket
    segments: list[Segment | None] = field(default_factory=list)
    slots: list[Slot] = field(default_factory=list)
    worker: str | None = None  # set by HELLO: the distributed worker this connection is


class ShmServer:
    """Listens on ``path`` (mode 0600); one thread per connection, one shared store."""

    def __init__(
        self, store: ParamStore, path: str | os.PathLike[str], max_state_bytes: int = 1 << 30
    ) -> None:
        """``max_state_bytes``: the largest ``LOAD_STATE`` message (HTTP's body limit for the
        same upload); every other message stays within ``MAX_PAYLOAD``."""
        self.store = store
        self.max_state_bytes = max_state_bytes
        self.path = Path(path)
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._conns: set[Connection] = set()
        self._lock = threading.Lock()
        self._closing = False
        self._pin = store.device == "cuda"  # page-lock segments only for a GPU store

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        if self.path.is_socket():  # a stale socket of a previous run
            self.path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # the socket file is born 0600: no window with wider access
        try:
            sock.bind(str(self.path))
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        sock.listen(64)
        self._sock = sock
        self._thread = threading.Thread(target=self._accept, name="stepd-shm", daemon=True)
        self._thread.start()
        log.info("shared-memory transport on %s", self.path)

    def stop(self) -> None:
        self._closing = True
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
            self._sock.close()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(5)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def _accept(self) -> None:
        assert self._sock is not None
        while not self._closing:
            try:
                sock, _ = self._sock.accept()
            except OSError:
                return
            conn = Connection(sock)
            with self._lock:
                self._conns.add(conn)
            threading.Thread(
                target=self._serve, args=(conn,), name="stepd-shm-conn", daemon=True
            ).start()

    def _serve(self, conn: Connection) -> None:
        sock = conn.sock
        buf = bytearray(1 << 16)
        view = memoryview(buf)
        have = 0  # bytes in buf; a request and its payload usually arrive in one read
        try:
            while True:
                while have < HEADER.size:
                    k = sock.recv_into(view[have:])
                    if k == 0:
                        if have:
                            raise ConnectionError("peer closed mid-message")
                        return
                    have += k
                op, _, n = HEADER.unpack_from(buf)
                if n > (self.max_state_bytes if op == LOAD_STATE else MAX_PAYLOAD):
                    raise ConnectionError(f"payload of {n} bytes is too large")
                end = HEADER.size + n
                if end > len(buf):  # a large control message: grow the buffer
                    view.release()
                    buf = buf[:have] + bytearray(end - have)
                    view = memoryview(buf)
                while have < end:
                    k = sock.recv_into(view[have:])
                    if k == 0:
                        raise ConnectionError("peer closed mid-message")
                    have += k
                payload = bytes(view[HEADER.size : end])
                if have > end:  # pipelined bytes of the next request
                    buf[: have - end] = view[end:have]
                have -= end
                status, reply = self._dispatch(conn, op, payload)
                sock.sendall(HEADER.pack(status, 0, len(reply)) + reply)
                if op == CLOSE and status == OK:
                    return
        except OSError as exc:  # reset by a crashed client, or the server stopping
            log.debug("shm connection ended: %r", exc)
        finally:
            view.release()
            self._detach_all(conn)
            sock.close()
            with self._lock:
                self._conns.discard(conn)

    def _dispatch(self, conn: Connection, op: int, payload: bytes) -> tuple[int, bytes]:
        try:
            return OK, self._handle(conn, op, payload)
        except NotFound as exc:
            return NOT_FOUND, str(exc).encode()
        except Conflict as exc:
            return CONFLICT, str(exc).encode()
        except (Invalid, BadTensor) as exc:
            return INVALID, str(exc).encode()
        except ProtocolError as exc:
            return BAD, str(exc).encode()
        except StragglerTimeout as exc:
            return TIMEOUT, str(exc).encode()
        except Exception as exc:  # never let one bad call kill the connection thread
            log.exception("shm op %d failed", op)
            return INTERNAL, f"internal error: {exc!r}".encode()

    # -- ops --------------------------------------------------------------------------------

    def _handle(self, conn: Connection, op: int, payload: bytes) -> bytes:
        store = self.store
        if op == STEP:
            slot = self._slot(conn, _u32(payload, 0, len(payload) == 4))
            entry = store.entry(slot.name)
            if entry.group.workers["mode"] != "plain":
                return self._step(conn, [slot])
            # the latency path: one parameter of a plain group, as little Python as possible
            if conn.worker is not None:
                store.workers.touch(conn.worker, 1)
            (outcome,) = store.step({slot.name: slot.grad})
            if entry.param is not slot.param:  # not adopted: copy the new value out
                with entry.lock:
                    _copy_out(entry.param, slot.param)
            return STEP_REPLY.pack(outcome.version, outcome.applied)
        if op == STEP_BATCH:
            count = _u32(payload, 0, len(payload) >= 4)
            if len(payload) != 4 + 4 * count:
                raise ProtocolError("STEP_BATCH: payload does not match its count")
            ids = struct.unpack_from(f"<{count}I", payload, 4)
            if len(set(ids)) != count:
                raise ProtocolError("STEP_BATCH: a slot appears twice")
            return self._step(conn, [self._slot(conn, i) for i in ids])
        if op == STEP_V:
            count = _u32(payload, 0, len(payload) >= 4)
            if len(payload) != 4 + SLOT_VERSION.size * count:
                raise ProtocolError("STEP_V: payload does not match its count")
            pairs = [
                SLOT_VERSION.unpack_from(payload, 4 + SLOT_VERSION.size * k) for k in range(count)
            ]
            if len({i for i, _ in pairs}) != count:
                raise ProtocolError("STEP_V: a slot appears twice")
            slots = [self._slot(conn, i) for i, _ in pairs]
            return self._step(
                conn, slots, {s.name: v for s, (_, v) in zip(slots, pairs, strict=True)}
            )
        if op == HELLO:
            self._hello(conn, _json(payload))
            return b""
        if op == ATTACH:
            return U32.pack(self._attach(conn, _json(payload)))
        if op == REGISTER:
            return json.dumps(self._register(conn, _json(payload))).encode()
        if op == END_ITERATION:
            count = store.sync_count()
            if conn.worker is not None and count is not None:
                store.workers.touch(conn.worker)
                step, _ = store.sync.end_iteration(conn.worker, count, store.sync_timeout())
                return U64.pack(step)
            return U64.pack(store.end_iteration())
        if op == SET_LR:
            lr = _f64(payload)
            store.set_lr(lr, payload[8:].decode() or None)
            return b""
        if op == GET_LR_SCALE:
            return F64.pack(store.lr_scale(payload.decode()))
        if op == SET_LR_SCALE:
            store.set_lr_scale(payload[8:].decode(), _f64(payload))
            return b""
        if op == GET_GROUP:
            gid = payload.decode()
            for g in store.groups():
                if g["id"] == gid:
                    return json.dumps(g).encode()
            raise NotFound(f"group {gid!r} does not exist")
        if op == STATE:
            return self._state(payload.decode())
        if op == LOAD_STATE:  # the body of HTTP's PUT /v1/groups/{id}/state, same rules
            k = _u32(payload, 0, len(payload) >= 4)
            if len(payload) < 4 + k:
                raise ProtocolError("LOAD_STATE: group id longer than the payload")
            try:
                gid = payload[4 : 4 + k].decode()
            except UnicodeDecodeError:
                raise ProtocolError("LOAD_STATE: group id is not UTF-8") from None
            tensors, meta = parse_safetensors(memoryview(payload)[4 + k :])
            store.load_group_state(gid, tensors, meta)
            return b""
        if op == HESSIAN:  # the client wrote the estimate where a gradient goes
            slot = self._slot(conn, _u32(payload, 0, len(payload) == 4))
            store.update_hessian(slot.name, slot.grad)
            return b""
        if op in (CLOSE, PING):
            return b""
        raise ProtocolError(f"unknown op {op}")

    def _slot(self, conn: Connection, i: int) -> Slot:
        if i >= len(conn.slots):
            raise NotFound(f"slot {i} is not registered on this connection")
        return conn.slots[i]

    def _hello(self, conn: Connection, meta: dict[str, Any]) -> None:
        worker = meta.get("worker")
        if not isinstance(worker, str) or not WORKER_RE.fullmatch(worker):
            raise Invalid(f"invalid worker id {worker!r}: 1-128 letters, digits and _ . : -")
        if conn.worker is not None and conn.worker != worker:
            raise Conflict(f"this connection is worker {conn.worker!r} already, not {worker!r}")
        conn.worker = worker
        self.store.workers.touch(worker)

    def _step(
        self, conn: Connection, slots: list[Slot], versions: dict[str, int] | None = None
    ) -> bytes:
        """Route each gradient by its group's workers mode, as HTTP's dataplane.apply does."""
        store = self.store
        versions = versions or {}
        entries = {s.name: store.entry(s.name) for s in slots}
        sync = [s for s in slots if entries[s.name].group.workers["mode"] == "sync"]
        if sync and conn.worker is None:
            raise Invalid(f"{sync[0].name!r} is in a sync group: send HELLO with a worker id")
        missing = [
            n
            for n, e in entries.items()
            if e.group.workers["mode"] == "async" and n not in versions
        ]
        if missing:
            raise Invalid(
                f"{missing[0]!r} is in an async group: step it with STEP_V and the parameter "
                "version its gradient was computed from"
            )
        if conn.worker is not None:
            store.workers.touch(conn.worker, len(slots))
        sync_names = {s.name for s in sync}
        rest = [s for s in slots if s.name not in sync_names]
        outcomes: dict[str, StepOutcome] = {}
        if rest:
            based_on = {s.name: versions[s.name] for s in rest if s.name in versions}
            for o in store.step({s.name: s.grad for s in rest}, based_on=based_on or None):
                outcomes[o.name] = o
            for s in rest:  # the new value, straight into the client's segment
                entry = entries[s.name]
                if entry.param is s.param:  # adopted: the kernel wrote it there already
                    continue
                with entry.lock:
                    _copy_out(entry.param, s.param)
        for s in sync:  # blocks until every worker's gradient for this round is in
            cfg = entries[s.name].group.workers
            o = outcomes[s.name] = store.sync.contribute(s.name, s.grad, conn.worker, None, cfg)
            np.copyto(s.param, np.asarray(o.param, F32).reshape(-1))
        return b"".join(
            STEP_REPLY.pack(outcomes[s.name].version, outcomes[s.name].applied) for s in slots
        )

    def _attach(self, conn: Connection, meta: dict[str, Any]) -> int:
        name, size = meta.get("segment"), meta.get("bytes")
        if not isinstance(name, str) or not SEGMENT_RE.fullmatch(name):
            raise Invalid(f"invalid segment name {name!r}: expected stepd-[A-Za-z0-9_.-]+")
        if not isinstance(size, int) or size <= 0:
            raise Invalid(f"invalid segment size {size!r}")
        try:
            fd = os.open(SHM_DIR / name, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NotFound(f"shared-memory segment {name!r} does not exist") from None
        except OSError as exc:
            raise Invalid(f"cannot open segment {name!r}: {exc.strerror}") from None
        try:
            st = os.fstat(fd)
            if st.st_uid != os.getuid() or stat.S_IMODE(st.st_mode) & 0o077:
                raise Invalid(f"segment {name!r} must belong to this user and be mode 0600")
            if st.st_size < size:
                raise Invalid(f"segment {name!r} has {st.st_size} bytes, expected {size}")
            mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        seg = Segment(name, mm, size)
        if self._pin:  # GPU store: page-locked host memory makes the copies run at full speed
            seg.pinned = _pin(mm, size)
        conn.segments.append(seg)
        return len(conn.segments) - 1

    def _register(self, conn: Connection, meta: dict[str, Any]) -> dict[str, Any]:
        try:
            name = meta["name"]
            shape = tuple(int(d) for d in meta["shape"])
            group = meta["group"]
            handle = int(meta["segment"])
            lr_scale = float(meta.get("lr_scale", 1.0))
            algorithm, hyperparams = group["algorithm"], group.get("hyperparams", {})
            workers = group.get("workers")
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError(f"REGISTER: malformed request: {exc!r}") from None
        if not isinstance(name, str) or not isinstance(hyperparams, dict):
            raise ProtocolError("REGISTER: name must be a string, hyperparams an object")
        if workers is not None and not isinstance(workers, dict):
            raise ProtocolError("REGISTER: the group's workers must be an object")
        if any(d < 0 for d in shape):
            raise Invalid(f"{name!r}: invalid shape {list(shape)}")
        size = math.prod(shape)
        if not 0 <= handle < len(conn.segments) or conn.segments[handle] is None:
            raise NotFound(f"segment handle {handle} is not attached")
        seg = conn.segments[handle]
        if seg.size < 8 * size:
            raise Invalid(f"{name!r}: segment has {seg.size} bytes, needs {8 * size}")
        param = np.frombuffer(seg.mm, F32, size, 0)
        grad = np.frombuffer(seg.mm, F32, size, 4 * size)
        entry, created = self.store.register(
            name, shape, param, algorithm, hyperparams, lr_scale, workers=workers
        )
        if not created:  # the server's copy wins: the client reads it from the segment
            np.copyto(param, self.store.read(name).reshape(-1))
        # Unless workers average into it (sync), the parameter lives in this segment from now
        # on: the step's kernel writes it in place and no copy follows (until detach).
        adopted = entry.group.workers["mode"] != "sync" and self.store.adopt(name, param)
        conn.slots.append(Slot(name, param, grad, adopted))
        return {
            "created": created,
            "group": entry.group.id,
            "slot": len(conn.slots) - 1,
            "version": entry.version,
        }

    def _state(self, gid: str) -> bytes:
        store = self.store
        if not gid:  # no group yet: just the global step
            raw = json.dumps({"global_step": store.global_step}).encode()
            return U32.pack(len(raw)) + raw
        with store.lock.shared():
            opt = store._groups.get(gid)
            if opt is None:
                raise NotFound(f"group {gid!r} does not exist")
            sd = opt.state_dict()
            versions = {e.name: e.version for e in store.iter_entries() if e.group.id == gid}
        blobs: list[bytes] = []
        offset = 0
        state = {}
        for name, st in sd["state"].items():
            slots = {}
            for slot, arr in st["slots"].items():
                arr = np.ascontiguousarray(arr, F32)
                slots[slot] = {"shape": list(arr.shape), "offset": offset, "bytes": arr.nbytes}
                blobs.append(arr.tobytes())
                offset += arr.nbytes
            state[name] = {"shape": st["shape"], "count": st["count"], "slots": slots}
        head = {
            "algorithm": sd["algorithm"],
            "hyperparams": sd["hyperparams"],
            "global_step": store.global_step,
            "lr": sd["lr"],
            "lr_scales": sd["lr_scales"],
            "versions": versions,
            "state": state,
        }
        raw = json.dumps(head).encode()
        return U32.pack(len(raw)) + raw + b"".join(blobs)

    def _detach_all(self, conn: Connection) -> None:
        """Drop the views, unpin, unmap and unlink every segment this connection attached."""
        for slot in conn.slots:  # first, adopted parameters move back into the store's memory
            if slot.adopted:
                try:
                    self.store.release(slot.name, slot.param)
                except Exception:  # never leave the other segments mapped and linked
                    log.exception("cannot move %s out of its segment", slot.name)
        conn.slots.clear()
        for seg in conn.segments:
            if seg is None:
                continue
            if seg.pinned is not None:
                _unpin(seg.pinned)
            try:
                seg.mm.close()
            except BufferError:  # a view still alive somewhere: the mapping goes with it
                log.warning("segment %s still has views; leaving it mapped", seg.name)
            try:
                os.unlink(SHM_DIR / seg.name)
            except FileNotFoundError:  # the client unlinked it first (its close())
                pass
            except OSError as exc:
                log.warning("cannot unlink segment %s: %s", seg.name, exc)
        conn.segments.clear()


def _copy_out(param: Any, out: np.ndarray) -> None:
    """A parameter's value into a client's segment (``out``, host memory)."""
    if hasattr(param, "get"):  # cupy: device -> pinned host segment
        param.get(out=out)
    else:
        np.copyto(out, param)


def _u32(payload: bytes, offset: int, ok: bool) -> int:
    if not ok:
        raise ProtocolError("malformed payload")
    return U32.unpack_from(payload, offset)[0]


def _f64(payload: bytes) -> float:
    if len(payload) < 8:
        raise ProtocolError("malformed payload")
    return F64.unpack_from(payload)[0]


def _json(payload: bytes) -> dict[str, Any]:
    try:
        meta = json.loads(payload)
    except ValueError as exc:
        raise ProtocolError(f"malformed JSON: {exc}") from None
    if not isinstance(meta, dict):
        raise ProtocolError("expected a JSON object")
    return meta


def _pin(mm: mmap.mmap, size: int) -> int:  # pragma: no cover - needs a GPU
    import cupy

    addr = np.frombuffer(mm, np.uint8, size).ctypes.data
    cupy.cuda.runtime.hostRegister(addr, size, 0)
    return addr


def _unpin(addr: int) -> None:  # pragma: no cover - needs a GPU
    import cupy

    cupy.cuda.runtime.hostUnregister(addr)
