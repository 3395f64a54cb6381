"""Regenerate the README's picture of the dashboard (docs/dashboard.png).

Starts a real ``stepd serve`` on a free loopback port, trains a small model against it from
two worker threads (a warm-up then cosine lr schedule, a checkpoint now and then), opens the
dashboard in headless Chromium (Debian's ``chromium`` and ``chromium-driver``, through
Selenium, as the browser tests do), selects a parameter and saves the window::

    python scripts/screenshot.py [--out docs/dashboard.png] [--iterations 240]
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

import stepd

SHAPES = {
    "embed.weight": (64, 32),
    "block0.attn.weight": (32, 32),
    "block0.attn.bias": (32,),
    "block0.mlp.weight": (128, 32),
    "block0.mlp.bias": (128,),
    "block1.attn.weight": (32, 32),
    "block1.mlp.weight": (128, 32),
    "norm.weight": (32,),
    "head.weight": (10, 32),
    "head.bias": (10,),
}
LR = 0.03


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve(folder: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {**os.environ, "STEPD_STATS_EVERY": "1", "STEPD_AUTOSAVE_EVERY": "60"}
    cmd = [sys.executable, "-m", "stepd.service.cli", "serve", "--port", str(port)]
    cmd += ["--device", "cpu", "--checkpoint-dir", str(folder), "--log-level", "warning"]
    proc = subprocess.Popen(cmd, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/healthz", timeout=0.5).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("the server did not start")


def lr_at(step: int, total: int) -> float:
    warmup = total // 8
    if step < warmup:
        return LR * (step + 1) / warmup
    return LR * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))


def train(url: str, iterations: int, done: threading.Event) -> None:
    """A noisy quadratic per parameter, of its own curvature; two workers step it in turn."""
    rng = np.random.default_rng(0)
    workers = [stepd.connect(url, run="toy-mlp", worker=f"worker-{i}", lr=LR) for i in (0, 1)]
    params = {n: 0.5 * rng.standard_normal(s).astype(np.float32) for n, s in SHAPES.items()}
    targets = {n: rng.standard_normal(s).astype(np.float32) for n, s in SHAPES.items()}
    curvature = dict(zip(SHAPES, rng.uniform(0.2, 3.0, len(SHAPES)).tolist(), strict=True))
    for step in range(iterations):
        opt = workers[step % 2]
        opt.set_lr(lr_at(step, iterations * 4 // 3))  # stopped before the lr reaches 0
        for name, p in params.items():
            noise = 0.05 * rng.standard_normal(p.shape).astype(np.float32)
            opt.step(name, p.shape, p, curvature[name] * (p - targets[name]) + noise)
        opt.end_iteration()
        time.sleep(0.03)
    done.set()
    for opt in workers:
        opt.close()


def browser(width: int, height: int):  # -> selenium WebDriver
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    options.add_argument(f"--window-size={width},{height}")
    driver = shutil.which("chromedriver") or "/usr/lib/chromium/chromedriver"
    return webdriver.Chrome(options=options, service=Service(executable_path=driver))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/dashboard.png"))
    parser.add_argument("--iterations", type=int, default=240)
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=1450)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        proc, url = serve(Path(folder))
        try:
            done = threading.Event()
            trainer = threading.Thread(target=train, args=(url, args.iterations, done))
            trainer.start()
            chrome = browser(args.width, args.height)
            try:
                chrome.get(f"{url}/?poll=500")
                time.sleep(2)
                # its own plots; clicked in the page, as the rows are redrawn by each poll
                row = '#params tr[data-name="block0.mlp.weight"] td'
                chrome.execute_script(f"document.querySelector('{row}').click()")
                done.wait()
                time.sleep(1.5)  # the last poll
                args.out.parent.mkdir(parents=True, exist_ok=True)
                chrome.save_screenshot(str(args.out))
            finally:
                chrome.quit()
            trainer.join()
        finally:
            proc.terminate()
            proc.wait(30)
    print(f"{args.out}: {args.out.stat().st_size:,} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
