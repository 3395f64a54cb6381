"""Start the real ``stepd serve`` process on a free loopback port (end-to-end tests)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from tests.support import fakecuda


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(cond, timeout: float = 10.0) -> bool:
    """Poll ``cond()`` until it holds (True) or ``timeout`` seconds pass (its last answer)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


class Server:
    def __init__(
        self, checkpoint_dir: Path, run: str | None = "t", device: str | None = None, **env: str
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [
            sys.executable,
            "-m",
            "stepd.service.cli",
            "serve",
            "--port",
            str(self.port),
            "--device",
            device or fakecuda.STORE_DEVICE,
            "--checkpoint-dir",
            str(checkpoint_dir),
            "--log-level",
            "warning",
        ]
        self.proc = subprocess.Popen(
            cmd, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.proc.stdout.read().decode()}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=0.5).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.05)
        else:
            self.stop()
            raise RuntimeError("server did not become healthy in 30 s")
        if run is not None:  # the named run the test works in (/v1/runs/<run>/...)
            headers = (
                {"authorization": f"Bearer {env['STEPD_TOKEN']}"} if "STEPD_TOKEN" in env else {}
            )
            r = httpx.post(f"{self.url}/v1/runs", json={"name": run}, headers=headers)
            r.raise_for_status()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class ShmServer(Server):
    """A server that also serves shm:// on a socket in a short temporary folder."""

    def __init__(self, device: str | None = None, **env: str) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="stepd-test-"))  # short: sun_path <= 107
        self.socket = self.dir / "stepd.sock"
        super().__init__(self.dir / "ckpt", device=device, STEPD_SHM_SOCKET=str(self.socket), **env)
        self.shm_url = f"shm://{self.socket}"

    def stop(self, *args, **kw) -> int:
        rc = super().stop(*args, **kw)
        shutil.rmtree(self.dir, ignore_errors=True)
        return rc
