"""A full checkpoint folder: listing and one restore, against anchors measured in the same run.

    python bench/checkpoints_folder.py [--files 300] [--mb 3]

- listing ``--files`` checkpoints of ``--mb`` MB each (``CheckpointDir.list``: headers only,
  each validated) next to a bare ``os.scandir`` + open + read of each file's 8 length bytes
  and header (no parsing): the cost of the listing's checks. Goal: well under a second.
- one restore (read, parse, validate, swap into a store) next to a raw read of the same
  file's bytes into memory: the cost of everything a restore does besides reading.

The files are warm in the page cache (written just before): both sides read the same way.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import struct
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.timing import timed  # noqa: E402


def bare_headers(folder: Path) -> int:
    """The anchor: every ``*.safetensors`` header read, nothing checked."""
    total = 0
    for entry in os.scandir(folder):
        if not entry.name.endswith(".safetensors"):
            continue
        fd = os.open(entry.path, os.O_RDONLY)
        try:
            (n,) = struct.unpack("<Q", os.pread(fd, 8, 0))
            total += len(os.pread(fd, n, 8))
        finally:
            os.close(fd)
    return total


def raw_read(path: Path) -> int:
    """The anchor: the file's bytes into memory, as a restore reads them."""
    with open(path, "rb") as f:
        data = np.empty(os.fstat(f.fileno()).st_size, np.uint8)
        return f.readinto(data.data) or 0


def main() -> None:
    from stepd.service.checkpoints import CheckpointDir
    from stepd.service.store import ParamStore

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=int, default=300)
    parser.add_argument("--mb", type=float, default=3.0)
    args = parser.parse_args()
    # AdamW: param + exp_avg + exp_avg_sq, 12 bytes an element, over a few parameters.
    elements = int(args.mb * 1e6 / 12)
    store = ParamStore("cpu")
    rng = np.random.default_rng(0)
    for i, share in enumerate((0.5, 0.3, 0.15, 0.05)):
        n = max(1, int(elements * share))
        store.register(f"layer{i}.weight", (n,), rng.standard_normal(n, np.float32), "adamw", {})
        store.step({f"layer{i}.weight": rng.standard_normal(n, np.float32)})
    with tempfile.TemporaryDirectory() as tmp:
        ckpts = CheckpointDir(Path(tmp) / "run")
        first = store.write_snapshot(lambda t, m: ckpts.save(t, m, "ckpt-0000"))
        src = ckpts.path("ckpt-0000")
        for i in range(1, args.files):
            shutil.copyfile(src, ckpts.path(f"ckpt-{i:04d}"))
        assert len(ckpts.list()) == args.files

        listing = statistics.median(timed(ckpts.list, 7))
        anchor = statistics.median(timed(lambda: bare_headers(ckpts.root), 7))
        print(
            f"listing {args.files} checkpoints of {first.bytes / 1e6:.1f} MB: "
            f"{listing * 1e3:.1f} ms; bare scandir + header reads {anchor * 1e3:.1f} ms; "
            f"ratio {listing / anchor:.2f}x (goal: well under 1 s)"
        )

        name = f"ckpt-{args.files // 2:04d}"
        path = ckpts.path(name)
        restore = statistics.median(timed(lambda: store.restore(*ckpts.load(name)), 7))
        read = statistics.median(timed(lambda: raw_read(path), 7))
        print(
            f"restore of one {first.bytes / 1e6:.1f} MB checkpoint: {restore * 1e3:.1f} ms; "
            f"raw read of its bytes {read * 1e3:.1f} ms; ratio {restore / read:.2f}x"
        )


if __name__ == "__main__":
    main()
