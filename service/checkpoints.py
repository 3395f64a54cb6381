"""Checkpoints: one safetensors file per checkpoint, written atomically.

The file holds every parameter (``param/<name>``) and state slot (``state/<name>/<slot>``);
its ``__metadata__["stepd"]`` is the JSON needed to rebuild the store (groups, global step,
lr, lr_scales, versions). A save writes ``.<name>.tmp-<random>`` in the same directory,
fsyncs it, renames it over ``<name>.safetensors`` and fsyncs the directory, so a crash leaves
either the old file or the new one — never half of one. Leftover temporaries are ignored when
listing and deleted at start-up.
"""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
import stat
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stepd.wire import WireError, dump_parts, parse

from .errors import Invalid, NotFound, StorageFull

SUFFIX = ".safetensors"
CHECKPOINT_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}$")
AUTO_PREFIX = "auto-"


@dataclass(frozen=True)
class CheckpointInfo:
    name: str
    global_step: int
    bytes: int
    created: float  # seconds since the epoch

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "global_step": self.global_step,
            "bytes": self.bytes,
            "created": self.created,
        }


def check_checkpoint_name(name: str) -> str:
    if not CHECKPOINT_NAME.fullmatch(name) or name.endswith(SUFFIX):
        raise Invalid(
            f"invalid checkpoint name {name!r}: 1-128 letters, digits, _ . - (not starting "
            "with . or -)"
        )
    return name


def write_safetensors(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> int:
    """Stream ``tensors`` into ``path`` (the wire's safetensors layout, written straight from
    the arrays: no in-memory copy of the whole file); fsynced. Returns the bytes written."""
    size = 0
    with open(path, "wb") as f:
        for part in dump_parts(tensors, metadata):
            f.write(part)
            size += len(part) if isinstance(part, bytes) else part.nbytes
        f.flush()
        os.fsync(f.fileno())
    return size


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CheckpointDir:
    """One run's checkpoints: a folder, created by the first save."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, name: str) -> Path:
        return self.root / f"{check_checkpoint_name(name)}{SUFFIX}"

    def clean_temporaries(self) -> list[str]:
        """Delete what interrupted saves left behind (start-up)."""
        removed: list[str] = []
        if not self.root.is_dir():
            return removed
        for p in self.root.glob(".*.tmp-*"):
            p.unlink(missing_ok=True)
            removed.append(p.name)
        return removed

    def save(
        self, tensors: dict[str, np.ndarray], meta: dict[str, Any], name: str | None
    ) -> CheckpointInfo:
        name = check_checkpoint_name(name or f"step-{meta['global_step']:08d}-{int(time.time())}")
        final = self.path(name)
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".{name}.tmp-{secrets.token_hex(4)}"
        try:
            size = write_safetensors(tmp, tensors, {"stepd": json.dumps(meta)})
            os.replace(tmp, final)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StorageFull(
                    f"checkpoint {name!r} not written: {exc.strerror}; a previous checkpoint "
                    "of that name is intact"
                ) from None
            raise
        finally:
            tmp.unlink(missing_ok=True)
        _fsync_dir(self.root)
        return CheckpointInfo(name, int(meta["global_step"]), size, final.stat().st_mtime)

    def load(self, name: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        path = self.path(name)
        try:  # no symlink is followed, and a FIFO cannot make the open wait
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NotFound(f"checkpoint {name!r} does not exist") from None
        except OSError as exc:
            raise Invalid(f"checkpoint {name!r} cannot be opened: {exc.strerror}") from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise Invalid(f"checkpoint {name!r} is not a regular file")
        with open(fd, "rb") as f:
            data = np.empty(st.st_size, np.uint8)  # not zero-filled, unlike bytearray
            if f.readinto(data.data) != data.size:
                raise Invalid(f"checkpoint {name!r} changed while being read")
        try:
            tensors, metadata = parse(data.data)
        except WireError as exc:
            raise Invalid(f"checkpoint {name!r} is malformed: {exc}") from None
        try:
            meta = json.loads(metadata["stepd"])
        except (KeyError, json.JSONDecodeError, RecursionError) as exc:
            raise Invalid(f"checkpoint {name!r} has no stepd metadata: {exc!r}") from None
        if not isinstance(meta, dict):
            raise Invalid(f"checkpoint {name!r}: its stepd metadata is not an object")
        return tensors, meta

    def list(self) -> list[CheckpointInfo]:
        infos: list[CheckpointInfo] = []
        if not self.root.is_dir():
            return infos
        for p in sorted(self.root.glob(f"*{SUFFIX}")):
            name = p.name[: -len(SUFFIX)]
            if not CHECKPOINT_NAME.fullmatch(name):
                continue
            try:
                st = p.lstat()
                if not stat.S_ISREG(st.st_mode):  # symlinks, FIFOs, folders: never opened
                    continue
                infos.append(CheckpointInfo(name, _peek_step(p), st.st_size, st.st_mtime))
            except (OSError, ValueError, KeyError, TypeError, RecursionError, struct.error):
                continue  # unreadable or not ours: not listed, never loaded
        return sorted(infos, key=lambda i: (i.created, i.name))

    def delete(self, name: str) -> None:
        path = self.path(name)
        if not path.exists():
            raise NotFound(f"checkpoint {name!r} does not exist")
        path.unlink()
        _fsync_dir(self.root)

    def prune_auto(self, keep: int) -> None:
        autos = [i for i in self.list() if i.name.startswith(AUTO_PREFIX)]
        for info in autos[: max(0, len(autos) - keep)]:
            self.path(info.name).unlink(missing_ok=True)


def _peek_step(path: Path) -> int:
    """The global step from a checkpoint's header, without reading its tensors."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > 100 * 1024 * 1024:
            raise ValueError("header too large")
        header = json.loads(f.read(n))
    step = json.loads(header["__metadata__"]["stepd"])["global_step"]
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"global step {step!r}")
    return step
