"""The shared-memory listener in process, spoken to byte by byte over its Unix socket."""

from __future__ import annotations

import json
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from stepd.service.config import Settings
from stepd.service.engine import Engine
from stepd.service.shm import ShmServer

from stepd.wire import F64, HEADER, PROTOCOL, U32, U64, Op, Status


@pytest.fixture
def listener() -> Iterator[tuple[Engine, Path]]:
    folder = Path(tempfile.mkdtemp(prefix="stepd-shm-"))  # short: sun_path <= 107
    engine = Engine(Settings(checkpoint_dir=folder / "ckpt", device="cpu"), "cpu")
    server = ShmServer(engine, folder / "s.sock")
    server.start()
    yield engine, folder / "s.sock"
    server.stop()


class Conn:
    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(path))
        self.sock.settimeout(10)

    def ask(self, op: int, payload: bytes = b"") -> tuple[int, bytes]:
        self.sock.sendall(HEADER.pack(op, 0, len(payload)) + payload)
        head = self._read(HEADER.size)
        status, _, n = HEADER.unpack(head)
        return status, self._read(n)

    def _read(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            assert chunk, "the server closed the connection"
            out += chunk
        return out


def test_hello_comes_first_and_binds_the_run(listener) -> None:
    engine, path = listener
    c = Conn(path)
    assert c.ask(Op.PING) == (Status.OK, b"")
    status, detail = c.ask(Op.END_ITERATION)
    assert status == Status.BAD_REQUEST
    assert b"HELLO first" in detail
    status, reply = c.ask(Op.HELLO, json.dumps({"run": "r1"}).encode())
    assert status == Status.OK
    info = json.loads(reply)
    assert (info["run"], info["anonymous"], info["protocol"]) == ("r1", False, PROTOCOL)
    assert info["limits"]["max_body_bytes"] == engine.settings.max_body_bytes
    assert c.ask(Op.HELLO, json.dumps({"run": "r2"}).encode())[0] == Status.CONFLICT
    assert c.ask(Op.END_ITERATION) == (Status.OK, U64.pack(1))
    assert engine.run("r1").store.global_step == 1


def test_errors_carry_the_engines_status(listener) -> None:
    _, path = listener
    c = Conn(path)
    assert c.ask(Op.HELLO, b"{not json")[0] == Status.BAD_REQUEST
    status, detail = c.ask(Op.HELLO, json.dumps({"run": "../x"}).encode())
    assert (status, b"invalid run name" in detail) == (Status.INVALID, True)
    status, detail = c.ask(Op.HELLO, json.dumps({"run": "r", "group": {"algorithm": "x"}}).encode())
    assert (status, b"unknown algorithm" in detail) == (Status.INVALID, True)
    assert c.ask(Op.HELLO, json.dumps({"run": "r"}).encode())[0] == Status.OK
    assert c.ask(Op.GET_LR_SCALE, b"nope")[0] == Status.NOT_FOUND
    assert c.ask(Op.SET_LR, F64.pack(-1.0))[0] == Status.INVALID
    assert c.ask(Op.STEP, b"\x00")[0] == Status.BAD_REQUEST  # malformed payload
    assert c.ask(Op.STEP, b"\x00\x00\x00\x00")[0] == Status.NOT_FOUND  # no such slot
    assert c.ask(999)[0] == Status.BAD_REQUEST
    assert c.ask(Op.PING) == (Status.OK, b"")  # the connection is still fine


def test_an_anonymous_run_lives_as_long_as_its_connection(listener) -> None:
    engine, path = listener
    c = Conn(path)
    status, reply = c.ask(Op.HELLO, json.dumps({"run": None}).encode())
    assert status == Status.OK
    name = json.loads(reply)["run"]
    assert engine.run(name).anonymous
    assert engine.run(name).holders == 1
    assert c.ask(Op.CLOSE) == (Status.OK, b"")
    c.sock.close()
    deadline = time.monotonic() + 5
    while name in {r["name"] for r in engine.runs()} and time.monotonic() < deadline:
        time.sleep(0.02)
    assert name not in {r["name"] for r in engine.runs()}


def test_odd_bytes_are_a_400_not_a_crash(listener) -> None:
    _, path = listener
    c = Conn(path)
    status, detail = c.ask(Op.HELLO, b"[" * 100000 + b"]" * 100000)
    assert (status, b"nested too deeply" in detail) == (Status.BAD_REQUEST, True)
    assert c.ask(Op.HELLO, json.dumps({"run": "r"}).encode())[0] == Status.OK
    status, detail = c.ask(Op.GET_LR_SCALE, b"\xff\xfe")  # a name that is not UTF-8
    assert (status, b"not UTF-8" in detail) == (Status.BAD_REQUEST, True)
    assert c.ask(Op.PING) == (Status.OK, b"")


def test_a_second_server_does_not_take_over_a_live_socket(listener) -> None:
    engine, path = listener
    with pytest.raises(RuntimeError, match="served by another process"):
        ShmServer(engine, path).start()
    c = Conn(path)  # the first one still answers
    assert c.ask(Op.PING) == (Status.OK, b"")


def _memfd(size: int, seals: int) -> int:
    import fcntl
    import os

    fd = os.memfd_create("stepd-test", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    if seals:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd


def _attach(c: Conn, fds: list[int], size: int = 64) -> tuple[int, bytes]:
    payload = json.dumps({"segment": "stepd-test", "bytes": size}).encode()
    socket.send_fds(c.sock, [HEADER.pack(Op.ATTACH, 0, len(payload)) + payload], fds)
    status, _, n = HEADER.unpack(c._read(HEADER.size))
    return status, c._read(n)


def test_only_sealed_memory_files_are_mapped(listener) -> None:
    """A client registered a parameter, then shrank the segment under the server's mapping:
    the server's next read died of SIGBUS and everything since the last checkpoint was lost.
    Now the server maps only memory files sealed against shrinking and growing."""
    import fcntl
    import os

    engine, path = listener
    c = Conn(path)
    assert c.ask(Op.HELLO, json.dumps({"run": "r"}).encode())[0] == Status.OK
    plain = _memfd(64, 0)
    status, detail = _attach(c, [plain])
    assert (status, b"must be sealed" in detail) == (Status.INVALID, True)
    status, detail = c.ask(Op.ATTACH, json.dumps({"segment": "stepd-x", "bytes": 64}).encode())
    assert (status, b"one memory file descriptor" in detail) == (Status.INVALID, True)
    sealed = _memfd(64, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    status, handle = _attach(c, [sealed])
    assert status == Status.OK
    body = {
        "name": "w",
        "shape": [8],
        "group": {"algorithm": "sgd"},
        "segment": U32.unpack(handle)[0],
    }
    assert c.ask(Op.REGISTER, json.dumps(body).encode())[0] == Status.OK
    with pytest.raises(PermissionError):  # the attack of the issue: refused by the kernel
        os.ftruncate(sealed, 0)
    np.testing.assert_array_equal(engine.read("r", "w"), np.zeros(8, np.float32))
    for fd in (plain, sealed):
        os.close(fd)


def test_hugetlb_memory_files_are_refused(listener) -> None:
    """A hole punched in a hugetlbfs file (fallocate) while the pool is empty makes the next
    touch of that page a SIGBUS, whatever the seals: the server maps only shmem files."""
    import fcntl
    import os

    _, path = listener
    huge = 2 << 20
    try:
        fd = os.memfd_create("stepd-test", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING | os.MFD_HUGETLB)
    except OSError as exc:  # no hugetlbfs in this kernel
        pytest.skip(f"no MFD_HUGETLB here: {exc}")
    try:
        os.ftruncate(fd, huge)  # no page is taken until one is touched
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
        c = Conn(path)
        assert c.ask(Op.HELLO, json.dumps({"run": "r"}).encode())[0] == Status.OK
        status, detail = _attach(c, [fd], huge)
        assert status == Status.INVALID
        assert b"hugetlbfs" in detail
    finally:
        os.close(fd)


def test_large_segments_register_on_huge_pages_where_the_host_allows(listener) -> None:
    """REGISTER collapses the bytes it admitted into transparent huge pages and says so."""
    import fcntl
    import os

    from stepd import hugepages

    _, path = listener
    n = 1 << 20  # 8 MiB: whole 2 MiB extents
    fd = _memfd(8 * n, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    try:
        c = Conn(path)
        assert c.ask(Op.HELLO, json.dumps({"run": "r"}).encode())[0] == Status.OK
        status, handle = _attach(c, [fd], 8 * n)
        assert status == Status.OK
        body = {"name": "w", "shape": [n], "group": {"algorithm": "sgd"}}
        body["segment"] = U32.unpack(handle)[0]
        status, reply = c.ask(Op.REGISTER, json.dumps(body).encode())
        assert status == Status.OK
        pages = json.loads(reply)["pages"]
        # what this process gets for a segment of its own is what the server got for ours
        own, mapped = hugepages.create_segment("stepd-test-own", 8 * n, fcntl.F_SEAL_SEAL)
        os.close(own)
        mapped.mm.close()
        assert pages == mapped.pages
        assert pages in (hugepages.THP, hugepages.SMALL)
        if pages == hugepages.THP:  # the server (this process) maps it with 2 MiB entries
            smaps = Path("/proc/self/smaps").read_text().split("\n")
            at = [i for i, line in enumerate(smaps) if "/memfd:stepd-test (deleted)" in line]
            pmd = [
                int(line.split()[1])
                for i in at
                for line in smaps[i : i + 30]
                if line.startswith("ShmemPmdMapped:")
            ]
            assert max(pmd) == 8 * n // 1024
    finally:
        os.close(fd)


def test_shm_registrations_keep_the_same_limits_as_http(tmp_path) -> None:
    """With STEPD_MAX_BODY_BYTES=64MiB HTTP refused a 128 MiB parameter but shm:// took it."""
    import fcntl
    import os

    folder = Path(tempfile.mkdtemp(prefix="stepd-shm-"))
    engine = Engine(
        Settings(checkpoint_dir=folder / "ckpt", device="cpu", max_body_bytes=1024), "cpu"
    )
    server = ShmServer(engine, folder / "s.sock")
    server.start()
    try:
        c = Conn(folder / "s.sock")
        assert c.ask(Op.HELLO, json.dumps({"run": "r"}).encode())[0] == Status.OK
        fd = _memfd(8 * 512, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
        status, handle = _attach(c, [fd], 8 * 512)
        os.close(fd)
        assert status == Status.OK
        body = {"name": "w", "shape": [512], "group": {"algorithm": "sgd"}}
        body["segment"] = U32.unpack(handle)[0]
        status, detail = c.ask(Op.REGISTER, json.dumps(body).encode())
        assert (status, b"body limit of 1024" in detail) == (Status.INVALID, True)
        assert engine.params("r") == []
    finally:
        server.stop()
