"""``shm://``: a real ``stepd serve --shm-socket`` process, segments in /dev/shm."""

from __future__ import annotations

import os
import re
import signal
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from stepd.client import AuthError, ConflictError, StepdOptimizer, TransportError, connect
from stepd.client.session import Session
from stepd.client.shm import ShmTransport
from stepd.kernels import create_optimizer

from tests.support import fakecuda
from tests.support.clients import connect_shared
from tests.support.server import ShmServer, wait_until
from tests.support.state import Spy

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="no /dev/shm")


@pytest.fixture(scope="module")
def srv() -> Iterator[ShmServer]:
    with ShmServer() as s:
        yield s


def mapped(pid: int, token: str) -> list[str]:
    """The segments (memory files) of the client ``token`` that process ``pid`` has mapped."""
    tag = f"/memfd:stepd-{token}-"
    lines = Path(f"/proc/{pid}/maps").read_text().splitlines()
    return sorted({line.split(tag, 1)[1].split()[0] for line in lines if tag in line})


def in_dev_shm() -> list[str]:
    return sorted(f for f in os.listdir("/dev/shm") if f.startswith("stepd-"))


def test_modes_http_view_and_cleanup_on_close(srv) -> None:
    """The socket is 0600; segments are memory files both ends map and nothing names in
    /dev/shm; HTTP inspection sees shm steps; close() unmaps all, on both sides."""
    assert stat.S_IMODE(os.stat(srv.socket).st_mode) == 0o600
    opt = connect_shared(srv.shm_url, "adamw", lr=1e-2)
    token = opt.transport._token
    assert mapped(srv.proc.pid, token) == []
    p = np.ones((3, 4), np.float32)
    q = np.zeros(5, np.float32)
    opt.step_batch([("cl.p", p.shape, p, np.ones_like(p)), ("cl.q", (5,), q, np.ones_like(q))])
    opt.step("cl.p", p.shape, p, np.full_like(p, 0.5))
    assert len(mapped(srv.proc.pid, token)) == 2
    assert mapped(os.getpid(), token) == mapped(srv.proc.pid, token)
    assert in_dev_shm() == []
    info = httpx.get(f"{srv.url}/v1/runs/t/params/cl.p").json()
    assert info["version"] == 2
    assert info["shape"] == [3, 4]
    value = httpx.get(f"{srv.url}/v1/runs/t/params/cl.p/value").content
    np.testing.assert_array_equal(np.frombuffer(value, np.float32).reshape(3, 4), p)
    opt.close()
    assert wait_until(lambda: mapped(srv.proc.pid, token) == [])
    assert mapped(os.getpid(), token) == []


def test_server_copy_wins_buffers_and_errors(srv) -> None:
    """A second client registering an existing name gets the server's value; buffers()
    (arrays living in the segment) step like copies; unknown names and conflicting
    registrations come back as the store's own errors."""
    with (
        connect_shared(srv.shm_url, "adamw", lr=1e-2) as a,
        connect_shared(srv.shm_url, "adamw", lr=1e-2) as b,
    ):
        p = np.full(6, 2.0, np.float32)
        a.step("win.p", (6,), p, np.ones(6, np.float32))
        q = np.zeros(6, np.float32)
        b.register("win.p", (6,), q)
        np.testing.assert_array_equal(q, p)  # the server's copy won

        assert isinstance(b.transport, ShmTransport)
        bp, bg = b.buffers("buf.p", (2, 3), np.ones((2, 3), np.float32))
        cp = np.ones((2, 3), np.float32)
        for i in range(3):
            bg[...] = i + 0.25
            b.step("buf.p", (2, 3), bp, bg)
            a.step("buf.c", (2, 3), cp, np.full((2, 3), i + 0.25, np.float32))
        np.testing.assert_array_equal(bp, cp)

        assert a.lr_scale("no.such.param") == 1.0  # rlx-optim's default, on every transport
    with (
        connect_shared(srv.shm_url, "adamw", lr=0.5) as c,  # another group for the same name
        pytest.raises(ConflictError, match="registered with shape"),
    ):
        c.step("win.p", (6,), np.zeros(6, np.float32), np.ones(6, np.float32))


def test_bad_input_raises_client_side_and_sends_nothing(srv) -> None:
    spy = Spy(Session(ShmTransport(str(srv.socket)), "adamw", {"lr": 1e-2}, run="t"))
    opt = StepdOptimizer(spy)
    token = spy.inner.transport._token
    p = np.zeros(4, np.float32)
    with pytest.raises(TypeError, match="float32"):
        opt.step("bad.p", (4,), p, np.zeros(4, np.float64))
    with pytest.raises(ValueError, match="elements"):
        opt.step("bad.p", (4,), p, np.zeros(5, np.float32))
    with pytest.raises(ValueError, match="C-contiguous"):
        opt.step("bad.p", (4,), p, np.zeros(8, np.float32)[::2])
    assert spy.ops == []
    assert mapped(os.getpid(), token) == []
    assert httpx.get(f"{srv.url}/v1/runs/t/params/bad.p").status_code == 404
    opt.close()


CRASHER = """
import sys, time, numpy as np
from stepd.client import connect
opt = connect(sys.argv[1], "adamw", lr=1e-2, run="t")
ps = {f"crash.{i}": np.ones(1000, np.float32) for i in range(3)}
for _ in range(3):
    opt.step_batch([(n, (1000,), p, np.ones(1000, np.float32)) for n, p in ps.items()])
print(opt.transport._token, flush=True)
while True:
    opt.step("crash.0", (1000,), ps["crash.0"], np.ones(1000, np.float32))
    time.sleep(0.001)
"""


def sigkill_client(script: str, srv: ShmServer, segments_before_kill: int) -> str:
    """Run ``script`` (prints its transport's token once its segments exist), SIGKILL it
    mid-run (no close(), no atexit) and return the token."""
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script), srv.shm_url],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        token = proc.stdout.readline().decode().strip()
        assert token, "the client did not start"
        assert len(mapped(srv.proc.pid, token)) == segments_before_kill
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        proc.kill()
        proc.wait()
    return token


def test_sigkilled_client_frees_its_segments(srv) -> None:
    token = sigkill_client(CRASHER, srv, 3)
    assert wait_until(lambda: mapped(srv.proc.pid, token) == [])  # the server let go of them
    assert in_dev_shm() == []  # and nothing was ever left in /dev/shm
    assert httpx.get(f"{srv.url}/healthz").status_code == 200
    with connect_shared(srv.shm_url, "adamw", lr=1e-2) as opt:  # still serving
        p = np.ones(1000, np.float32)
        opt.step("crash.0", (1000,), p, np.ones(1000, np.float32))
        assert httpx.get(f"{srv.url}/v1/runs/t/params/crash.0").json()["version"] >= 4


@pytest.mark.e2e
def test_server_gone_mid_run_leaves_param_untouched() -> None:
    with ShmServer() as s:
        opt = connect_shared(s.shm_url, "sgd", lr=0.1)
        p = np.ones(8, np.float32)
        opt.step("gone.p", (8,), p, np.ones(8, np.float32))
        token = opt.transport._token
        s.stop(signal.SIGKILL)
        before = p.copy()
        with pytest.raises(TransportError, match="shm://"):
            opt.step("gone.p", (8,), p, np.full(8, 5.0, np.float32))
        np.testing.assert_array_equal(p, before)
        opt.close()
        assert mapped(os.getpid(), token) == []


def test_a_client_that_just_exits_leaves_nothing_behind(srv) -> None:
    """No close(): the process ends, its connection with it, and the server unmaps its
    segments; no file was ever made for them, so there is nothing to unlink."""
    script = textwrap.dedent(
        """
        import sys
        import numpy as np
        from stepd.client import connect
        opt = connect(sys.argv[1], "sgd", lr=0.1, run="t")
        opt.step("exit.p", (4,), np.ones(4, np.float32), np.ones(4, np.float32))
        print(opt.transport._token, flush=True)
        sys.stdin.readline()
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script, srv.shm_url],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        token = proc.stdout.readline().decode().strip()
        assert len(mapped(srv.proc.pid, token)) == 1
        assert in_dev_shm() == []
        _, err = proc.communicate(b"\n", timeout=30)
        assert proc.returncode == 0, err
        assert b"Warning" not in err
        assert wait_until(lambda: mapped(srv.proc.pid, token) == [])
    finally:
        proc.kill()
        proc.wait()


def _value(srv, name: str) -> np.ndarray:
    return np.frombuffer(httpx.get(f"{srv.url}/v1/runs/t/params/{name}/value").content, np.float32)


def _pmd_kb(pid: int, label: str) -> int:
    """kB of the memory file ``label`` that process ``pid`` maps with 2 MiB entries."""
    total, inside = 0, False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
            inside = f"/memfd:{label} " in line or line.endswith(f"/memfd:{label}")
        elif inside and line.startswith("ShmemPmdMapped:"):
            total += int(line.split()[1])
    return total


@pytest.mark.skipif(fakecuda.ENABLED, reason="a CUDA store keeps params on the device")
def test_large_segments_report_their_pages_and_step_exactly(srv) -> None:
    """A segment of whole 2 MiB extents goes on transparent huge pages where the host allows
    (MADV_COLLAPSE): the page mode the server reports is what its page tables show, and
    steps over it equal the in-process kernel bit for bit."""
    n = 1 << 20  # 8 MiB: param and gradient
    rng = np.random.default_rng(3)
    p0 = rng.standard_normal(n, dtype=np.float32)
    grads = [rng.standard_normal(n, dtype=np.float32) for _ in range(3)]
    local = create_optimizer("adamw", backend="cpu", lr=1e-2)
    want = p0.copy()
    with connect_shared(srv.shm_url, "adamw", lr=1e-2) as opt:
        assert isinstance(opt.transport, ShmTransport)
        bp, bg = opt.buffers("huge.p", (n,), p0)
        pages = opt.transport.pages("huge.p")
        assert pages in ("thp", "4k")
        label = opt.transport._segments["huge.p"].name
        for g in grads:
            bg[...] = g
            opt.step("huge.p", (n,), bp, bg)
            local.step("huge.p", (n,), want, g)
        np.testing.assert_array_equal(bp, want)
        if pages == "thp":  # the server's mapping, and ours, hold 2 MiB entries
            assert _pmd_kb(srv.proc.pid, label) == 8 * n // 1024
            assert _pmd_kb(os.getpid(), label) == 8 * n // 1024
        elif pages == "4k":
            assert _pmd_kb(srv.proc.pid, label) == 0


def _sgd(p: np.ndarray, g: np.ndarray, lr: float = 0.1) -> None:
    p -= np.float32(lr) * g  # torch.optim.SGD without momentum, in float32


@pytest.mark.skipif(fakecuda.ENABLED, reason="a CUDA store keeps params on the device")
def test_param_lives_in_its_creators_segment_until_it_leaves(srv) -> None:
    """The first shm client of a name lends its segment as the parameter's storage (the
    kernel updates it in place, no copy follows a step): writes to its buffers() param are
    the server's value. Others get copies; when the lender leaves, the value moves back
    into the server's memory and nothing is lost."""
    a = connect_shared(srv.shm_url, "sgd", lr=0.1)
    bp, bg = a.buffers("lend.p", (4,), np.ones(4, np.float32))
    oracle = np.ones(4, np.float32)
    for _ in range(3):
        bg[...] = 0.5
        a.step("lend.p", (4,), bp, bg)
        _sgd(oracle, np.full(4, 0.5, np.float32))
    np.testing.assert_array_equal(bp, oracle)
    bp[...] = 7.0  # the segment is the server's storage
    oracle[...] = 7.0
    np.testing.assert_array_equal(_value(srv, "lend.p"), oracle)
    with connect_shared(srv.shm_url, "sgd", lr=0.1) as b:
        q = np.zeros(4, np.float32)
        b.register("lend.p", (4,), q)
        np.testing.assert_array_equal(q, oracle)  # the server's copy wins
        b.step("lend.p", (4,), q, np.ones(4, np.float32))
        _sgd(oracle, np.ones(4, np.float32))
        np.testing.assert_array_equal(q, oracle)
        np.testing.assert_array_equal(bp, oracle)  # the lender's segment holds it
        a.close()
        assert wait_until(
            lambda: httpx.get(f"{srv.url}/v1/runs/t/params/lend.p").status_code == 200
        )
        np.testing.assert_array_equal(_value(srv, "lend.p"), oracle)
        for _ in range(2):
            b.step("lend.p", (4,), q, np.ones(4, np.float32))
            _sgd(oracle, np.ones(4, np.float32))
        np.testing.assert_array_equal(q, oracle)
        np.testing.assert_array_equal(_value(srv, "lend.p"), oracle)


LENDER = """
import sys, time, numpy as np
from stepd.client import connect
opt = connect(sys.argv[1], "sgd", lr=0.1, run="t")
p = np.ones(1000, np.float32)
for _ in range(3):
    opt.step("lent.0", (1000,), p, np.full(1000, 0.5, np.float32))
print(opt.transport._token, flush=True)
time.sleep(60)
"""


def test_a_sigkilled_lender_loses_nothing(srv) -> None:
    token = sigkill_client(LENDER, srv, 1)
    assert wait_until(lambda: mapped(srv.proc.pid, token) == [])
    oracle = np.ones(1000, np.float32)
    for _ in range(3):
        _sgd(oracle, np.full(1000, 0.5, np.float32))
    np.testing.assert_array_equal(_value(srv, "lent.0"), oracle)
    with connect_shared(srv.url, "sgd", lr=0.1) as opt:  # and it steps on, from the same value
        p = np.zeros(1000, np.float32)
        opt.step("lent.0", (1000,), p, np.ones(1000, np.float32))
        _sgd(oracle, np.ones(1000, np.float32))
        np.testing.assert_array_equal(p, oracle)


@pytest.mark.e2e
def test_with_a_token_hello_must_carry_it() -> None:
    """The socket's 0600 mode admits every process of the server's user; with STEPD_TOKEN
    set, a connection does nothing before a HELLO with the token."""
    with ShmServer(STEPD_TOKEN="s3cret") as s:
        for token in (None, "wrong", ""):
            with pytest.raises(AuthError, match="missing or wrong token"):
                connect(s.shm_url, "sgd", token=token, lr=0.1)
        with connect(s.shm_url, "sgd", token="s3cret", lr=0.1) as opt:
            p = np.ones(2, np.float32)
            opt.step("w", (2,), p, np.ones(2, np.float32))
            np.testing.assert_allclose(p, 0.9)
        runs = httpx.get(f"{s.url}/v1/runs", headers={"authorization": "Bearer s3cret"}).json()
        assert [r["name"] for r in runs] == ["t"]  # the refused ones made nothing


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.mark.e2e
def test_an_announced_but_unsent_state_costs_nothing(srv) -> None:
    """Three 8-byte headers announcing 400 MiB state uploads took the server's RSS from 65 MB
    to 1.27 GB with nothing sent; now only what arrives is held."""
    import socket as socketlib

    from stepd.wire import HEADER, Op

    before = _rss_mb(srv.proc.pid)
    socks = []
    for _ in range(3):
        sock = socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_STREAM)
        sock.connect(str(srv.socket))
        sock.sendall(HEADER.pack(Op.LOAD_STATE, 0, 400 << 20) + b"x" * 1000)
        socks.append(sock)
    time.sleep(0.5)
    grown = _rss_mb(srv.proc.pid) - before
    for sock in socks:
        sock.close()
    assert grown < 64, f"the server grew by {grown:.0f} MB"
    assert httpx.get(f"{srv.url}/healthz").status_code == 200


@pytest.mark.e2e
def test_a_burst_of_connections_waits_its_turn() -> None:
    """150 clients at once: the listen backlog held 64 and 74 failed with EAGAIN; now all
    connect. Past the connection cap, a client waits until one leaves."""
    import threading

    with ShmServer(STEPD_SHM_MAX_CONNECTIONS="8") as s:
        errors: list[BaseException] = []

        def client() -> None:
            try:
                with connect(s.shm_url, "sgd", lr=0.1, timeout=30) as opt:
                    p = np.ones(2, np.float32)
                    opt.step("w", (2,), p, np.ones(2, np.float32))
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=client) for _ in range(150)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert errors == []
        assert not any(t.is_alive() for t in threads)
