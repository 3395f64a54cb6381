"""Checkpoint save and restore against this disk, measured in the same run, interleaved.

    python bench/checkpoints_io.py [--gb 1.0] [--repeat 3] [--params 4]

A run of AdamW parameters (param + exp_avg + exp_avg_sq: 12 bytes an element, over
``--params`` tensors) saved and restored through the engine, as ``POST .../checkpoints`` and
``.../restore`` do, next to its anchors:

- save: the engine's checkpoint (snapshot, write, fsync, rename, fsync of the folder) against
  one ``write`` of a buffer of the same size into a new file, then ``fsync`` (goal >= 0.8x);
- restore: the engine's restore (read, parse, screen, swap) against a raw read of the same
  file into a freshly allocated buffer (a restore must produce fresh memory too), cold and
  warm (goal >= 0.8x). Cold: the file's pages are dropped from the page cache with
  ``posix_fadvise(DONTNEED)`` first (the file is fsynced, so they are clean and do go);
  warm: read again right after, all of it cached.

Each round runs every figure once, in turn; the medians of ``--repeat`` rounds are printed,
as GB/s (1e9 bytes) and as ratios to their anchors.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def drop_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def raw_write(path: Path, block: np.ndarray) -> None:
    """The anchor of a save: one write of the whole buffer, fsynced."""
    with open(path, "wb", buffering=0) as f:
        view = memoryview(block).cast("B")
        while view:
            view = view[f.write(view) or 0 :]
        os.fsync(f.fileno())


def raw_read(path: Path) -> int:
    """The anchor of a restore: the file's bytes into a new buffer, nothing else."""
    with open(path, "rb", buffering=0) as f:
        data = np.empty(os.fstat(f.fileno()).st_size, np.uint8)
        view, done = memoryview(data), 0
        while done < data.size:
            done += f.readinto(view[done:]) or 0
        return done


def seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    from stepd.service.config import Settings
    from stepd.service.engine import Engine

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gb", type=float, default=1.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--params", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        engine = Engine(Settings(checkpoint_dir=Path(tmp), device="cpu"), "cpu")
        engine.open_run("bench")
        store = engine.run("bench").store
        each = int(args.gb * 1e9 / 12 / args.params)
        rng = np.random.default_rng(0)
        for i in range(args.params):
            store.register(f"layer{i}.weight", (each,), None, "adamw", {})
            store.step({f"layer{i}.weight": rng.standard_normal(each, np.float32)})
        info = engine.save_checkpoint("bench", "bench")
        path = engine.run("bench").checkpoints.path("bench")
        size = info.bytes
        block = np.ones(size, np.uint8)
        anchor_path = Path(tmp) / "raw.bin"
        times: dict[str, list[float]] = {}

        def record(key: str, fn: Callable[[], object], cold: Path | None = None) -> None:
            if cold is not None:
                drop_cache(cold)
            times.setdefault(key, []).append(seconds(fn))

        for _ in range(args.repeat):
            record("write", lambda: raw_write(anchor_path, block))
            anchor_path.unlink()
            record("save", lambda: engine.save_checkpoint("bench", "bench"))
            record("read cold", lambda: raw_read(path), cold=path)
            record("restore cold", lambda: engine.restore_checkpoint("bench", "bench"), cold=path)
            record("read warm", lambda: raw_read(path))
            record("restore warm", lambda: engine.restore_checkpoint("bench", "bench"))

    rate = {k: size / statistics.median(v) / 1e9 for k, v in times.items()}
    spread = {k: (size / max(v) / 1e9, size / min(v) / 1e9) for k, v in times.items()}
    print(
        f"checkpoint of {size / 1e9:.2f} GB ({args.params} AdamW parameters), median of "
        f"{args.repeat} interleaved rounds, GB/s (min-max):"
    )
    for key in ("write", "save", "read cold", "restore cold", "read warm", "restore warm"):
        lo, hi = spread[key]
        print(f"  {key:<13} {rate[key]:6.2f}  ({lo:.2f}-{hi:.2f})")
    print(f"save / fsynced write          {rate['save'] / rate['write']:.2f}x  (goal >= 0.8)")
    for kind in ("cold", "warm"):
        print(
            f"restore / raw read, {kind}     {rate[f'restore {kind}'] / rate[f'read {kind}']:.2f}x"
            "  (goal >= 0.8)"
        )


if __name__ == "__main__":
    main()
