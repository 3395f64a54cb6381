"""The shared-memory data plane: a Unix-domain-socket listener next to the HTTP API.

Same host only. A client (:mod:`stepd.client.shm`) creates one segment per parameter — an
anonymous memory file (``memfd_create``) sized once (the parameter's float32 bytes, then the
gradient's) and sealed against shrinking and growing — and passes its descriptor over the
socket with ATTACH (``SCM_RIGHTS``): nothing is named in ``/dev/shm``, no other connection
can reach it, and no client can pull the memory from under the server's mapping (SIGBUS).
Then only small binary control messages cross the socket: the server reads the gradient
where the client wrote it (a zero-copy numpy view) and writes the updated parameter back
into the segment. On a CPU store, the segment of the connection that registers a name first
(outside sync groups) becomes the parameter's storage (:meth:`ParamStore.adopt`): the kernel
updates it in place and no copy follows the step; other connections get copies. When that
connection closes, the value moves back into the store's memory (``ParamStore.release``)
before the segment is unmapped. Segments are mapped on huge pages where the host allows
(:mod:`stepd.hugepages`; the collapse runs at REGISTER, for the bytes the budget admitted),
and REGISTER's reply says which (``"pages"``).

The wire format is :mod:`stepd.wire`'s (opcodes, layouts, statuses); every op calls the
engine (``service/engine.py``), exactly as the HTTP routes do, so a rule holds the same on
both transports and the inspection API and ``/metrics`` see shm steps. An error's payload is
its detail (UTF-8), its status the engine's. JSON appears only in rare metadata (hello,
attach, register, group, state); steps are ``struct``-packed ids. ``LOAD_STATE`` carries
the safetensors body of HTTP's state upload, up to the same limit; every other message stays
within ``MAX_PAYLOAD``. No pickle, ever.

``HELLO`` comes first and once: it carries the server's token when one is configured
(``STEPD_TOKEN``; the socket's 0600 mode alone admits every process of the server's user),
binds the connection to its run (``{"run": name}`` joins
or creates a named run, ``"fresh": true`` deletes it first; ``{"run": null}`` creates an
anonymous run that the connection owns and that is deleted when it closes), names its
distributed worker (``"worker"``, validated like HTTP's ``?worker=``), and is answered with
the run's name, the wire protocol and the server's limits. A group's ``workers`` config
travels in REGISTER's group JSON. A step of a sync-group name blocks in the connection's
thread until its round completes (a straggler timeout is a 504); an async-group name must be
stepped with ``STEP_V``, which carries the parameter version each gradient was computed from
(a stale one is a 409, nothing applied). Sophia's Hessian estimate (``HESSIAN``) travels
like a gradient, in the segment's gradient half.

When a connection closes (``CLOSE``, a clean exit or a client crash), the server drops its
views and unmaps every segment that connection attached, and only those; the memory goes
with the last mapping.
"""

from __future__ import annotations

import array
import contextlib
import fcntl
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

from stepd import hugepages
from stepd.wire import (
    F32,
    F64,
    HEADER,
    MAX_PAYLOAD,
    MAX_REQUEST_HEADER_BYTES,
    PROTOCOL,
    SLOT_VERSION,
    ST_CODES,
    STATE_CODES,
    STEP_REPLY,
    STEP_STALE,
    U8,
    U32,
    U64,
    Op,
    Status,
    parse,
)

from .engine import Engine
from .errors import Conflict, Invalid, NotFound, status_of

log = logging.getLogger("stepd.shm")

SEGMENT_RE = re.compile(r"^stepd-[A-Za-z0-9_.\-]{1,200}$")
SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
FDS_SPACE = socket.CMSG_SPACE(4 * 4)  # room for a few descriptors per read
_BEFORE_HELLO = {Op.HELLO, Op.PING, Op.CLOSE}


class ProtocolError(Exception):
    """A malformed message (400): the connection stays usable."""


@dataclass
class Segment:
    name: str
    mm: mmap.mmap
    size: int
    offset: int = 0  # where the file's byte 0 lies in ``mm`` (an aligned mapping's start)
    pages: str = hugepages.SMALL  # thp or 4k (stepd.hugepages)
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
    fds: list[int] = field(default_factory=list)  # passed with the message being read
    run: str | None = None  # set by HELLO: the run every op of this connection acts on
    owns_run: bool = False  # an anonymous run made by HELLO: deleted when the connection ends
    worker: str | None = None  # set by HELLO: the distributed worker this connection is


class ShmServer:
    """Listens on ``path`` (mode 0600); one thread per connection, one shared store."""

    def __init__(
        self, engine: Engine, path: str | os.PathLike[str], max_connections: int = 256
    ) -> None:
        """``max_connections``: served at once (a thread each); more wait to be accepted."""
        self.engine = engine
        self._slots = threading.BoundedSemaphore(max_connections)
        # LOAD_STATE carries what HTTP's state upload does, up to the same limit
        self.max_state_bytes = engine.limits()["max_state_bytes"]
        self.path = Path(path)
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._conns: set[Connection] = set()
        self._lock = threading.Lock()
        self._closing = False
        self._pin = engine.device == "cuda"  # page-lock segments only for a GPU store

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        if self.path.is_socket():  # a previous server's: stale, unless one still answers
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(str(self.path))
            except OSError:
                self.path.unlink()
            else:
                raise RuntimeError(f"{self.path} is served by another process: not taking it over")
            finally:
                probe.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # the socket file is born 0600: no window with wider access
        try:
            sock.bind(str(self.path))
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        sock.listen(socket.SOMAXCONN)  # a burst of connects waits in the backlog
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
            # at the cap, the next connection waits in the backlog until one closes
            while not self._slots.acquire(timeout=0.5):
                if self._closing:
                    return
            try:
                sock, _ = self._sock.accept()
            except OSError:
                self._slots.release()
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
                    k = self._recv(conn, view[have:])
                    if k == 0:
                        if have:
                            raise ConnectionError("peer closed mid-message")
                        return
                    have += k
                op, _, n = HEADER.unpack_from(buf)
                if n > (self.max_state_bytes if op == Op.LOAD_STATE else MAX_PAYLOAD):
                    raise ConnectionError(f"payload of {n} bytes is too large")
                end = HEADER.size + n
                if end > len(buf):  # a large control message (a state upload)
                    payload = self._receive_large(sock, bytes(view[HEADER.size : have]), n)
                    have = 0
                else:
                    while have < end:
                        k = self._recv(conn, view[have:])
                        if k == 0:
                            raise ConnectionError("peer closed mid-message")
                        have += k
                    payload = bytes(view[HEADER.size : end])
                    if have > end:  # pipelined bytes of the next request
                        buf[: have - end] = view[end:have]
                    have -= end
                status, reply = self._dispatch(conn, op, payload)
                _close_all(conn.fds)  # any the op did not take
                sock.sendall(HEADER.pack(status, 0, len(reply)) + reply)
                if op == Op.CLOSE and status == Status.OK:
                    return
        except OSError as exc:  # reset by a crashed client, or the server stopping
            log.debug("shm connection ended: %r", exc)
        finally:
            view.release()
            _close_all(conn.fds)
            self._detach_all(conn)
            sock.close()
            with self._lock:
                self._conns.discard(conn)
            self._slots.release()

    @staticmethod
    def _recv(conn: Connection, into: memoryview) -> int:
        """``recv_into`` that also takes the descriptors a client passes (``SCM_RIGHTS``,
        with ATTACH); they wait in ``conn.fds`` for the message they came with."""
        k, ancillary, flags, _ = conn.sock.recvmsg_into([into], FDS_SPACE)
        for level, kind, data in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                conn.fds.extend(array.array("i", data[: len(data) - len(data) % 4]))
        if flags & socket.MSG_CTRUNC:
            raise ConnectionError("more descriptors than a message may carry")
        return k

    @staticmethod
    def _receive_large(sock: socket.socket, first: bytes, n: int) -> bytes:
        """A message of ``n`` bytes, held only as far as it has arrived: a header that
        announces a gigabyte and sends nothing costs nothing."""
        payload = bytearray(first)
        while len(payload) < n:
            chunk = sock.recv(min(n - len(payload), 1 << 20))
            if not chunk:
                raise ConnectionError("peer closed mid-message")
            payload += chunk
        return bytes(payload)

    def _dispatch(self, conn: Connection, op: int, payload: bytes) -> tuple[int, bytes]:
        try:
            return Status.OK, self._handle(conn, op, payload)
        except ProtocolError as exc:
            return Status.BAD_REQUEST, str(exc).encode()
        except UnicodeDecodeError as exc:  # a name or group id that is not UTF-8
            return Status.BAD_REQUEST, f"not UTF-8: {exc}".encode()
        except Exception as exc:  # never let one bad call kill the connection thread
            status = status_of(exc)
            if status == Status.INTERNAL:
                log.exception("shm op %d failed", op)
                return status, f"internal error: {exc!r}".encode()
            return status, str(exc).encode()

    # -- ops --------------------------------------------------------------------------------

    def _handle(self, conn: Connection, op: int, payload: bytes) -> bytes:
        engine, run = self.engine, conn.run
        if run is None:
            if op == Op.HELLO:
                return json.dumps(self._hello(conn, _json(payload))).encode()
            if op in _BEFORE_HELLO:
                return b""
            raise ProtocolError("send HELLO first: it names the run this connection acts on")
        if op == Op.STEP:
            slot = self._slot(conn, _u32(payload, 0, len(payload) == 4))
            entry = engine.entry(run, slot.name)
            if entry.group.workers["mode"] != "plain":
                return self._step(conn, [slot])
            # the latency path: one parameter of a plain group
            (outcome,) = engine.step(
                run, {slot.name: slot.grad}, worker=conn.worker, transport="shm"
            )
            if entry.param is not slot.param:  # not adopted: copy the new value out
                with entry.lock:
                    _copy_out(entry.param, slot.param)
            return STEP_REPLY.pack(outcome.version, outcome.applied)
        if op in (Op.STEP_BATCH, Op.STEP_LAST):
            count = _u32(payload, 0, len(payload) >= 4)
            if len(payload) != 4 + 4 * count:
                raise ProtocolError("STEP_BATCH: payload does not match its count")
            ids = struct.unpack_from(f"<{count}I", payload, 4)
            if len(set(ids)) != count:
                raise ProtocolError("STEP_BATCH: a slot appears twice")
            return self._step(conn, [self._slot(conn, i) for i in ids], last=op == Op.STEP_LAST)
        if op == Op.STEP_V:
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
        if op == Op.HELLO:
            raise Conflict(f"this connection is bound to run {run!r} already")
        if op == Op.ATTACH:
            return U32.pack(self._attach(conn, _json(payload)))
        if op == Op.REGISTER:
            return json.dumps(self._register(conn, _json(payload))).encode()
        if op == Op.END_ITERATION:
            end = engine.end_iteration(run, conn.worker)
            dropped = json.dumps({"dropped": end.dropped}).encode() if end.dropped else b""
            return U64.pack(end.step) + dropped
        if op in (Op.JOIN, Op.LEAVE, Op.HEARTBEAT):
            if conn.worker is None:
                raise Invalid("sync membership needs a worker id: name it in HELLO")
            if op == Op.JOIN:  # waits in this connection's thread, as a sync step does
                info = engine.join(run, conn.worker).wait()
            elif op == Op.LEAVE:
                info = engine.leave(run, conn.worker)
            else:
                info = engine.heartbeat(run, conn.worker)
            return json.dumps(info.to_dict()).encode()
        if op == Op.SET_LR:
            engine.set_lr(run, _f64(payload), payload[8:].decode() or None)
            return b""
        if op == Op.SET_HYPERPARAMS:
            body = _json(payload)
            if not isinstance(body, dict) or not isinstance(body.get("group"), str):
                raise Invalid("SET_HYPERPARAMS: a JSON object with a group id and changes")
            now = engine.set_hyperparams(run, body["group"], body.get("changes") or {})
            return json.dumps(now).encode()
        if op == Op.GET_LR_SCALE:
            return F64.pack(engine.lr_scale(run, payload.decode()))
        if op == Op.SET_LR_SCALE:
            engine.set_lr_scale(run, payload[8:].decode(), _f64(payload))
            return b""
        if op == Op.GET_GROUP:
            return json.dumps(engine.group(run, payload.decode())).encode()
        if op == Op.STATE:
            return self._state(run, payload.decode())
        if op == Op.LOAD_STATE:  # the body of HTTP's PUT .../groups/{id}/state, same rules
            k = _u32(payload, 0, len(payload) >= 4)
            if len(payload) < 4 + k:
                raise ProtocolError("LOAD_STATE: group id longer than the payload")
            try:
                gid = payload[4 : 4 + k].decode()
            except UnicodeDecodeError:
                raise ProtocolError("LOAD_STATE: group id is not UTF-8") from None
            tensors, meta = parse(
                memoryview(payload)[4 + k :], MAX_REQUEST_HEADER_BYTES, STATE_CODES
            )
            engine.load_group_state(run, gid, tensors, meta)
            return b""
        if op == Op.HESSIAN:  # the client wrote the estimate where a gradient goes
            slot = self._slot(conn, _u32(payload, 0, len(payload) == 4))
            engine.update_hessian(run, slot.name, slot.grad)
            return b""
        if op == Op.SET_VALUE:  # the client wrote the value where a gradient goes
            slot = self._slot(conn, _u32(payload, 0, len(payload) == 4))
            engine.set_value(run, slot.name, slot.grad)
            return b""
        if op == Op.PULL:
            return self._pull(conn, payload)
        if op in (Op.CLOSE, Op.PING):
            return b""
        raise ProtocolError(f"unknown op {op}")

    def _slot(self, conn: Connection, i: int) -> Slot:
        if i >= len(conn.slots):
            raise NotFound(f"slot {i} is not registered on this connection")
        return conn.slots[i]

    def _hello(self, conn: Connection, meta: dict[str, Any]) -> dict[str, Any]:
        """Bind the connection to its run (named, or a new anonymous one it owns) and, for
        distributed workers, name its worker; validated completely first."""
        self.engine.authorize(meta.get("token"))  # first: nothing is looked at without it
        name, fresh, worker = meta.get("run"), meta.get("fresh", False), meta.get("worker")
        group = meta.get("group")
        if group is not None and not isinstance(group, dict):
            raise ProtocolError("HELLO: group must be an object")
        if name is not None and not isinstance(name, str):
            raise ProtocolError("HELLO: run must be a string or null")
        if not isinstance(fresh, bool):
            raise ProtocolError("HELLO: fresh must be true or false")
        engine = self.engine
        run, _ = engine.open_run(name, fresh=fresh, group=group, worker=worker)
        conn.run, conn.owns_run, conn.worker = run.name, name is None, worker
        run.holders += 1
        status = engine.status()
        return {
            "run": run.name,
            "anonymous": run.anonymous,
            "protocol": PROTOCOL,
            "limits": status["limits"],
            "shard": status["shard"],
        }

    def _unbind(self, conn: Connection) -> None:
        """The connection leaves its run; a run it made (anonymous) is deleted."""
        if conn.run is None:
            return
        try:
            run = self.engine.run(conn.run)
        except NotFound:  # deleted meanwhile
            run = None
        if run is not None:
            run.holders -= 1
            if conn.owns_run:
                with contextlib.suppress(NotFound):
                    self.engine.delete_run(conn.run)
        conn.run, conn.owns_run = None, False

    def _step(
        self,
        conn: Connection,
        slots: list[Slot],
        versions: dict[str, int] | None = None,
        last: bool = False,
    ) -> bytes:
        """Step through the engine, then put each new value into the client's segment."""
        assert conn.run is not None
        engine, run = self.engine, conn.run
        outcomes = engine.step(
            run,
            {s.name: s.grad for s in slots},
            worker=conn.worker,
            versions=versions,
            read_back=False,
            transport="shm",
            last=last,
        )
        for s, o in zip(slots, outcomes, strict=True):
            entry = engine.entry(run, s.name)
            if entry.param is s.param:  # adopted: the kernel wrote it there already
                continue
            if o.param is not None:  # a sync round's result
                np.copyto(s.param, np.asarray(o.param, F32).reshape(-1))
                continue
            with entry.lock:
                _copy_out(entry.param, s.param)
        return b"".join(
            STEP_REPLY.pack(o.version, STEP_STALE if o.stale else o.applied) for o in outcomes
        )

    def _pull(self, conn: Connection, payload: bytes) -> bytes:
        """Each slot's current value into its segment's param half; the versions."""
        assert conn.run is not None
        count = _u32(payload, 0, len(payload) >= 4)
        if count == 0 or len(payload) != 4 + 4 * count:
            raise ProtocolError("PULL: payload does not match its count")
        slots = [self._slot(conn, i) for i in struct.unpack_from(f"<{count}I", payload, 4)]
        engine, run = self.engine, conn.run
        pulled = engine.pull(run, [s.name for s in slots])
        for s, (_, value) in zip(slots, pulled, strict=True):
            if engine.entry(run, s.name).param is not s.param:  # adopted: it is there already
                np.copyto(s.param, value.reshape(-1))
        return struct.pack(f"<{count}Q", *(version for version, _ in pulled))

    def _attach(self, conn: Connection, meta: dict[str, Any]) -> int:
        """Map the memory file the client passed with this message; only one sealed against
        shrinking and growing is taken (else a client could pull the memory from under the
        mapping, and the server would die of SIGBUS on its next read)."""
        name, size = meta.get("segment"), meta.get("bytes")
        if not isinstance(name, str) or not SEGMENT_RE.fullmatch(name):
            raise Invalid(f"invalid segment name {name!r}: expected stepd-[A-Za-z0-9_.-]+")
        if not isinstance(size, int) or size <= 0:
            raise Invalid(f"invalid segment size {size!r}")
        if len(conn.fds) != 1:
            raise Invalid(f"ATTACH passes one memory file descriptor, got {len(conn.fds)}")
        fd = conn.fds.pop()
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise Invalid(f"segment {name!r} is not a memory file")
            try:
                seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
            except OSError:
                seals = 0
            if seals & SEALS != SEALS:
                raise Invalid(
                    f"segment {name!r} must be sealed against shrinking and growing "
                    "(F_SEAL_SHRINK | F_SEAL_GROW)"
                )
            if st.st_size != size:
                raise Invalid(f"segment {name!r} has {st.st_size} bytes, expected {size}")
            if hugepages.is_hugetlb(fd):  # a hole punched in one, the pool empty: SIGBUS
                raise Invalid(f"segment {name!r} is on hugetlbfs: only shmem memory files")
            # aligned, for huge pages (collapsed at REGISTER): 4 KiB ones slow every step
            mapped = hugepages.map_segment(fd, size)
        finally:
            os.close(fd)
        seg = Segment(name, mapped.mm, size, mapped.offset, mapped.pages)
        if self._pin:  # GPU store: page-locked host memory makes the copies run at full speed
            seg.pinned = _pin(seg.mm, seg.offset, size)
        conn.segments.append(seg)
        return len(conn.segments) - 1

    def _register(self, conn: Connection, meta: dict[str, Any]) -> dict[str, Any]:
        assert conn.run is not None
        try:
            name = meta["name"]
            shape = tuple(int(d) for d in meta["shape"])
            group = meta["group"]
            handle = int(meta["segment"])
            lr_scale = float(meta.get("lr_scale", 1.0))
            algorithm, hyperparams = group["algorithm"], group.get("hyperparams", {})
            workers = group.get("workers")
            shard = meta.get("shard")
            shard_view = None if shard is None else (int(shard[0]), int(shard[1]))
        except (KeyError, TypeError, ValueError, IndexError) as exc:
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
        assert seg is not None
        if seg.size < 8 * size:
            raise Invalid(f"{name!r}: segment has {seg.size} bytes, needs {8 * size}")
        param = np.frombuffer(seg.mm, F32, size, seg.offset)
        grad = np.frombuffer(seg.mm, F32, size, seg.offset + 4 * size)
        engine, run = self.engine, conn.run
        entry, created = engine.register(
            run, name, shape, param, algorithm, hyperparams, lr_scale, workers, shard_view
        )
        # Huge pages for the bytes the budget just admitted (a client's own collapse made
        # this cheap; an older client's 4 KiB pages get copied once, here).
        seg.pages = hugepages.collapse(hugepages.Mapped(seg.mm, seg.offset, seg.pages), 8 * size)
        log.debug("%s: segment %s of %d bytes on %s pages", name, seg.name, seg.size, seg.pages)
        adopted = engine.adopt(run, name, param, created)
        conn.slots.append(Slot(name, param, grad, adopted))
        return {
            "created": created,
            "group": entry.group.id,
            "slot": len(conn.slots) - 1,
            "version": entry.version,
            "pages": seg.pages,
        }

    def _state(self, run: str, gid: str) -> bytes:
        engine = self.engine
        if not gid:  # no group yet: just the global step
            raw = json.dumps({"global_step": engine.global_step(run)}).encode()
            return U32.pack(len(raw)) + raw
        sd, versions = engine.group_state(run, gid)
        blobs: list[bytes] = []
        offset = 0
        state = {}
        for name, st in sd["state"].items():
            slots = {}
            for slot, arr in st["slots"].items():
                arr = np.ascontiguousarray(arr, arr.dtype if arr.dtype == U8 else F32)
                slots[slot] = {
                    "shape": list(arr.shape),
                    "dtype": ST_CODES[arr.dtype],  # F32, or U8: 8-bit state's codes
                    "offset": offset,
                    "bytes": arr.nbytes,
                }
                blobs.append(arr.tobytes())
                offset += arr.nbytes
            state[name] = {"shape": st["shape"], "count": st["count"], "slots": slots}
        head = {
            "algorithm": sd["algorithm"],
            "hyperparams": sd["hyperparams"],
            "global_step": sd["global_step"],
            "lr": sd["lr"],
            "lr_scales": sd["lr_scales"],
            "versions": versions,
            "state": state,
        }
        raw = json.dumps(head).encode()
        return U32.pack(len(raw)) + raw + b"".join(blobs)

    def _detach_all(self, conn: Connection) -> None:
        """Drop the views, unpin and unmap every segment this connection attached."""
        for slot in conn.slots:  # first, adopted parameters move back into the run's memory
            if slot.adopted and conn.run is not None:
                try:
                    self.engine.release(conn.run, slot.name, slot.param)
                except Exception:  # never leave the other segments mapped and linked
                    log.exception("cannot move %s out of its segment", slot.name)
        conn.slots.clear()
        self._unbind(conn)
        for seg in conn.segments:
            if seg is None:
                continue
            if seg.pinned is not None:
                _unpin(seg.pinned)
            try:
                seg.mm.close()
            except BufferError:  # a view still alive somewhere: the mapping goes with it
                log.warning("segment %s still has views; leaving it mapped", seg.name)
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
    except RecursionError:
        raise ProtocolError("JSON nested too deeply") from None
    if not isinstance(meta, dict):
        raise ProtocolError("expected a JSON object")
    return meta


def _pin(mm: mmap.mmap, offset: int, size: int) -> int:  # pragma: no cover - needs a GPU
    import cupy

    addr = np.frombuffer(mm, np.uint8, size, offset).ctypes.data
    cupy.cuda.runtime.hostRegister(addr, size, 0)
    return addr


def _unpin(addr: int) -> None:  # pragma: no cover - needs a GPU
    import cupy

    cupy.cuda.runtime.hostUnregister(addr)


def _close_all(fds: list[int]) -> None:
    while fds:
        with contextlib.suppress(OSError):
            os.close(fds.pop())
