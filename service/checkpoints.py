"""Checkpoints: one safetensors file per checkpoint, written atomically.

The file holds every parameter (``param/<name>``) and state slot (``state/<name>/<slot>``);
its ``__metadata__["stepd"]`` is the JSON needed to rebuild the store (groups, global step,
lr, lr_scales, versions). A save writes ``.<name>.tmp-<random>`` in the same directory,
fsyncs it, renames it over ``<name>.safetensors`` and fsyncs the directory, so a crash leaves
either the old file or the new one — never half of one. Leftover temporaries are ignored when
listing and deleted at start-up.

Anything else in the folder named ``*.safetensors`` that is not a checkpoint we could restore
(a symlink, FIFO or folder, an empty or torn file, a header or metadata that is not ours, a
name no route can address) is never opened for its data and never listed: :meth:`scan`
reports it, with the reason, next to the valid ones. Listing reads each file's header only.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import json
import os
import re
import secrets
import stat
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stepd.wire import MAX_HEADER_BYTES, STATE_CODES, WireError

from .errors import Conflict, Invalid, NotFound, StorageFull
from .tensorfile import Progress, no_progress, read_file, write_file

SUFFIX = ".safetensors"
CHECKPOINT_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}$")
AUTO_PREFIX = "auto-"
PARAM_PREFIX = "param/"  # the tensors screened for NaN and Inf as they are read


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


@dataclass
class Activity:
    """A save or restore under way: ``done`` of ``total`` bytes of checkpoint ``name``."""

    action: str  # "save" or "restore"
    name: str
    done: int = 0
    total: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"action": self.action, "name": self.name, "done": self.done, "total": self.total}


@dataclass(frozen=True)
class InvalidCheckpoint:
    """A ``*.safetensors`` entry of the folder that is not a checkpoint, and why."""

    name: str  # the entry's file name, as found (it may not be a valid checkpoint name)
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "reason": self.reason}


class _NotOurs(Exception):
    """Why a folder entry is not a valid checkpoint (listing only)."""


def _valid_name(name: str) -> bool:
    return bool(CHECKPOINT_NAME.fullmatch(name)) and not name.endswith(SUFFIX)


def check_checkpoint_name(name: str) -> str:
    if not _valid_name(name):
        raise Invalid(
            f"invalid checkpoint name {name!r}: 1-128 letters, digits, _ . - (not starting "
            "with . or -)"
        )
    return name


def write_safetensors(
    path: Path,
    tensors: dict[str, Any],
    metadata: dict[str, str],
    progress: Progress = no_progress,
) -> int:
    """Write ``tensors`` into ``path`` (the wire's safetensors layout, straight from the
    arrays' buffers in large writes: no copy of the file in memory; device arrays through
    a bounded host staging buffer); fsynced. Returns the bytes written."""
    return write_file(path, tensors, metadata, progress)


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
        self.activity: Activity | None = None  # the latest save or restore under way

    @contextlib.contextmanager
    def _tracked(self, action: str, name: str, progress: Progress) -> Iterator[Progress]:
        """A progress callback that also keeps :attr:`activity` up to date."""
        activity = Activity(action, name)
        self.activity = activity

        def track(done: int, total: int) -> None:
            activity.done, activity.total = done, total
            progress(done, total)

        try:
            yield track
        finally:
            if self.activity is activity:
                self.activity = None

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
        self,
        tensors: dict[str, Any],
        meta: dict[str, Any],
        name: str | None,
        progress: Progress = no_progress,
    ) -> CheckpointInfo:
        name = check_checkpoint_name(name or f"step-{meta['global_step']:08d}-{int(time.time())}")
        final = self.path(name)
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".{name}.tmp-{secrets.token_hex(4)}"
        try:
            with self._tracked("save", name, progress) as track:
                size = write_safetensors(tmp, tensors, {"stepd": json.dumps(meta)}, track)
            os.replace(tmp, final)
        except OSError as exc:
            if exc.errno in (errno.EISDIR, errno.ENOTEMPTY):
                raise Conflict(
                    f"checkpoint {name!r} not written: a folder has its file's name"
                ) from None
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
        tensors, meta, _ = self.load_info(name)
        return tensors, meta

    def load_info(
        self, name: str, progress: Progress = no_progress, xp: Any = np
    ) -> tuple[dict[str, Any], dict[str, Any], CheckpointInfo]:
        """The whole file, read and parsed, and its info, from one open file: once it is
        open, a delete or a replacing save of ``name`` cannot change what this returns, so a
        restore built on it is all or nothing. Each tensor is a new writable array of its
        own (read straight into it); every ``param/`` tensor has been screened finite
        (``Invalid`` otherwise). ``xp`` CuPy: new device arrays, on the current stream,
        each uploaded through a bounded host staging buffer as it is read (see
        ``tensorfile.read_file``): the file is never whole in host memory."""
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
        try:
            with self._tracked("restore", name, progress) as track:
                tensors, metadata, bad = read_file(
                    fd,
                    st.st_size,
                    lambda key: key.startswith(PARAM_PREFIX),
                    track,
                    STATE_CODES,
                    xp,
                )
        except WireError as exc:
            raise Invalid(f"checkpoint {name!r} is malformed: {exc}") from None
        except EOFError:
            raise Invalid(f"checkpoint {name!r} changed while being read") from None
        finally:
            os.close(fd)
        if bad:
            raise Invalid(f"checkpoint {name!r}: {min(bad)!r} has non-finite values")
        try:
            meta = json.loads(metadata["stepd"])
        except (KeyError, ValueError, RecursionError) as exc:  # ValueError: int digit limit
            raise Invalid(f"checkpoint {name!r} has no stepd metadata: {exc!r}") from None
        if not isinstance(meta, dict):
            raise Invalid(f"checkpoint {name!r}: its stepd metadata is not an object")
        try:
            step = _global_step(meta)
        except _NotOurs as exc:
            raise Invalid(f"checkpoint {name!r}: {exc}") from None
        return tensors, meta, CheckpointInfo(name, step, st.st_size, st.st_mtime)

    def list(self) -> list[CheckpointInfo]:
        return self.scan()[0]

    def scan(self) -> tuple[builtins.list[CheckpointInfo], builtins.list[InvalidCheckpoint]]:
        """The valid checkpoints (oldest first) and every other ``*.safetensors`` entry with
        the reason it is not one (by name). Hidden entries (``.*``: a save's temporaries)
        and files of other suffixes are not ours to judge and appear in neither."""
        infos: list[CheckpointInfo] = []
        invalid: list[InvalidCheckpoint] = []
        try:
            entries = list(os.scandir(self.root))
        except (FileNotFoundError, NotADirectoryError):
            return infos, invalid
        for entry in entries:
            if entry.name.startswith(".") or not entry.name.endswith(SUFFIX):
                continue
            name = entry.name[: -len(SUFFIX)]
            try:
                if not _valid_name(name):
                    raise _NotOurs("not a valid checkpoint name (it cannot be restored)")
                infos.append(_peek(entry, name))
            except _NotOurs as exc:
                invalid.append(InvalidCheckpoint(entry.name, str(exc)))
        infos.sort(key=lambda i: (i.created, i.name))
        invalid.sort(key=lambda i: i.name)
        return infos, invalid

    def delete(self, name: str) -> None:
        """Remove ``name``'s entry, whatever it is but a folder (a symlink goes, not what it
        points to): what a listing reports as invalid can be removed by name too."""
        path = self.path(name)
        try:
            if stat.S_ISDIR(path.lstat().st_mode):
                raise Conflict(f"checkpoint {name!r} is a folder: not removed")
            path.unlink()
        except FileNotFoundError:  # also when a concurrent delete took it first
            raise NotFound(f"checkpoint {name!r} does not exist") from None
        _fsync_dir(self.root)

    def prune_auto(self, keep: int) -> None:
        autos = [i for i in self.list() if i.name.startswith(AUTO_PREFIX)]
        for info in autos[: max(0, len(autos) - keep)]:
            self.path(info.name).unlink(missing_ok=True)


def _peek(entry: os.DirEntry[str], name: str) -> CheckpointInfo:
    """A checkpoint's info from its header alone, or ``_NotOurs`` with the reason. The data
    is never read: the header's offsets are checked against the file's size instead."""
    if entry.is_symlink():  # from the directory entry itself: not followed
        raise _NotOurs("a symbolic link (never followed)")
    try:
        fd = os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:  # swapped for a symlink since, or not readable
        raise _NotOurs(f"cannot be opened: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = "a folder" if stat.S_ISDIR(st.st_mode) else "not a regular file"
            raise _NotOurs(kind + (" (a FIFO)" if stat.S_ISFIFO(st.st_mode) else ""))
        if st.st_size == 0:
            raise _NotOurs("empty (0 bytes)")
        head = os.pread(fd, 8, 0)
        if len(head) < 8:
            raise _NotOurs(f"{st.st_size} bytes: shorter than a safetensors header")
        (n,) = struct.unpack("<Q", head)
        if n > min(MAX_HEADER_BYTES, st.st_size - 8):
            raise _NotOurs(f"header length {n} beyond the file or the limit")
        raw = os.pread(fd, n, 8)
    except OSError as exc:
        raise _NotOurs(f"cannot be read: {exc.strerror}") from None
    finally:
        os.close(fd)
    if len(raw) != n:
        raise _NotOurs("changed while being read")
    try:
        header = json.loads(raw)
    except ValueError:  # not UTF-8, not JSON, or an integer beyond Python's digit limit
        raise _NotOurs("the header is not JSON") from None
    except RecursionError:
        raise _NotOurs("the header is nested too deeply") from None
    if not isinstance(header, dict):
        raise _NotOurs("the header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    stepd_meta = metadata.get("stepd") if isinstance(metadata, dict) else None
    if not isinstance(stepd_meta, str):
        raise _NotOurs("no stepd metadata in the header")
    try:
        meta = json.loads(stepd_meta)
    except ValueError:
        raise _NotOurs("the stepd metadata is not JSON") from None
    except RecursionError:
        raise _NotOurs("the stepd metadata is nested too deeply") from None
    if not isinstance(meta, dict):
        raise _NotOurs("the stepd metadata is not an object")
    step = _global_step(meta)
    end = 0
    for key, info in header.items():
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        ):
            raise _NotOurs(f"the header's entry {key[:100]!r} has no valid data_offsets")
        end = max(end, offsets[1])
    if end != st.st_size - 8 - n:  # a torn (or appended-to) file
        raise _NotOurs(
            f"the header describes {end} bytes of data, the file holds {st.st_size - 8 - n}"
        )
    return CheckpointInfo(name, step, st.st_size, st.st_mtime)


def _global_step(meta: dict[str, Any]) -> int:
    step = meta.get("global_step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise _NotOurs(f"invalid global step {str(step)[:100]!r} in the stepd metadata")
    return step
