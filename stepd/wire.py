"""What crosses the wire between a stepd client and a stepd server, defined once.

Both ends import this module and it imports neither of them (nor the numeric core): names and
their rules, HTTP headers and media types, the status codes every error maps to, the float32
safetensors codec, the stable shard hash, and the shared-memory control protocol (opcodes and
binary layouts). A change here is a protocol change; :data:`PROTOCOL` says which one a server
speaks and it is announced when a client joins a run.

**shm:// control messages** (little-endian): a request is :data:`HEADER` ``(op, 0, payload
length)`` and its payload; a reply is ``(status, 0, payload length)`` and its payload, the
status one of :class:`Status` (an error's payload is its UTF-8 detail). Tensors never cross
the socket: they lie in shared-memory segments both sides map. The payload of each op is
given beside it in :class:`Op`.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
import struct
from collections.abc import Mapping, Sequence
from enum import IntEnum
from typing import Any, NamedTuple

import numpy as np

PROTOCOL = 3  # 1: one global namespace per server; 2: runs; 3: a stale async gradient is
# answered with the current parameter (not an error), and workers can pull

F32 = np.dtype("<f4")

# -- precisions --------------------------------------------------------------------------------
# Gradients (and the parameters a client gets back) may be in the model's precision; the
# server's master weights and state are float32. NumPy has no bfloat16 type: a bfloat16 array
# is held as its bits, a uint16 array (in stepd a uint16 tensor always means bfloat16).
BF16 = np.dtype("<u2")
F16 = np.dtype("<f2")
DTYPE_NAMES: dict[np.dtype, str] = {F32: "float32", BF16: "bfloat16", F16: "float16"}
DTYPES_BY_NAME = {name: dtype for dtype, name in DTYPE_NAMES.items()}
# Optimizer state is float32 too, except 8-bit state: uint8 codes (plus float32 scales).
U8 = np.dtype("u1")
# safetensors' dtype codes of the same
ST_CODES: dict[np.dtype, str] = {F32: "F32", BF16: "BF16", F16: "F16", U8: "U8"}
ST_DTYPES = {code: dtype for dtype, code in ST_CODES.items()}
GRAD_CODES = ("F32", "BF16", "F16")  # what a step's gradients may be
STATE_CODES = ("F32", "U8")  # what state slots may be (the algorithm says which is which)


def dtype_named(name: str) -> np.dtype:
    """The dtype of a precision name (``float32``, ``bfloat16``, ``float16``); ValueError."""
    try:
        return DTYPES_BY_NAME[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown dtype {name!r}; expected one of {', '.join(DTYPES_BY_NAME)}"
        ) from None


def widen(xp: Any, x: Any) -> Any:
    """``x`` (float32, bfloat16 bits or float16) as float32, exactly; float32 as it is.
    ``xp``: numpy or cupy."""
    if x.dtype == F32:
        return x
    if x.dtype == BF16:
        return (x.astype(xp.uint32) << 16).view(xp.float32)
    return x.astype(xp.float32)


def narrow(xp: Any, x: Any, dtype: np.dtype) -> Any:
    """float32 ``x`` rounded to ``dtype`` to nearest even, as torch's ``.to()`` rounds."""
    if dtype == F32:
        return x
    if dtype == F16:
        with np.errstate(over="ignore"):  # beyond float16's range is Inf, as in torch
            return x.astype(xp.float16)
    bits = xp.ascontiguousarray(x, dtype=xp.float32).view(xp.uint32)
    # Round to nearest even on the 16 bits dropped: add 0x7FFF plus the kept LSB. NaN
    # (never a parameter: they are screened) would need a quiet bit; no other case does.
    # In place in one temporary: half the time of the expression's four (8.4M: 6.7 ms).
    rounded = bits >> 16
    rounded &= 1
    rounded += 0x7FFF
    rounded += bits
    rounded >>= 16
    return rounded.astype(xp.uint16)


# -- names -----------------------------------------------------------------------------------

# "." and ".." are refused: no path or URL could address them.
PARAM_NAME_RE = re.compile(r"^(?!\.{1,2}$)[A-Za-z0-9_.:\-\[\]]{1,256}$")
PARAM_NAME_RULE = "1-256 characters of letters, digits and _ . : - [ ] (not . or ..)"
# Run names become folder names under the checkpoint dir: no leading dot, no separators.
RUN_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,63}$")
RUN_NAME_RULE = "1-64 letters, digits and _ . - (not starting with . or -)"
WORKER_RE = re.compile(r"^[A-Za-z0-9_.:\-]{1,128}$")
WORKER_RULE = "1-128 letters, digits and _ . : -"
# 16-128 characters: long enough that ids from different clients do not meet by chance.
REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9_.:\-]{16,128}$")
REQUEST_ID_RULE = "16-128 letters, digits and _ . : -"

# -- HTTP ------------------------------------------------------------------------------------

REQUEST_ID_HEADER = "x-stepd-request-id"
VERSION_HEADER = "x-stepd-version"
APPLIED_HEADER = "x-stepd-applied"
# "true" on a step refused as stale (async groups): nothing applied, and the reply's parameter
# and X-Stepd-Version are the current ones, to continue from
STALE_HEADER = "x-stepd-stale"
SHAPE_HEADER = "x-stepd-shape"
# On a sync step's reply: the workers dropped from the iteration (lease expired), comma-separated
DROPPED_HEADER = "x-stepd-dropped"
OCTET = "application/octet-stream"
SAFETENSORS = "application/x-safetensors"
# The precision of a raw (octet-stream) gradient body; the reply's is ``?return_dtype=``
# (default: the gradient's).
DTYPE_HEADER = "x-stepd-dtype"


class Status(IntEnum):
    """Every outcome, as an HTTP status; shm:// replies carry the same numbers."""

    OK = 200
    BAD_REQUEST = 400  # a malformed message
    UNAUTHORIZED = 401  # missing or wrong bearer token
    NOT_FOUND = 404  # unknown run, parameter, slot, group or checkpoint
    CONFLICT = 409  # conflicting registration, stale gradient, duplicate contribution
    TOO_LARGE = 413  # over a size limit
    INVALID = 422  # the content is refused
    INTERNAL = 500
    TIMEOUT = 504  # a sync round or barrier did not complete in time
    INSUFFICIENT_STORAGE = 507  # over the server's memory budget or the run's quota


# -- the shard hash --------------------------------------------------------------------------


def shard_of(name: str, count: int) -> int:
    """The shard of ``count`` that owns ``name``: a stable hash (BLAKE2b), the same in every
    process and every Python run (never the salted built-in ``hash``)."""
    digest = hashlib.blake2b(name.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") % count


# -- tensors: raw bytes and safetensors ------------------------------------------------------


class WireError(ValueError):
    """Bytes that do not match what they claim (length, dtype, header, offsets)."""


MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit (checkpoints)
# A request's header (gradients of one step, a group's state): room for ~100k tensors.
MAX_REQUEST_HEADER_BYTES = 8 * 1024 * 1024


def from_bytes(
    body: bytes | bytearray | memoryview, shape: tuple[int, ...], what: str, dtype: np.dtype = F32
) -> np.ndarray:
    """A read-only view of ``body`` (no copy) as ``dtype``, checked against ``shape``."""
    if any(d < 0 for d in shape):
        raise WireError(f"{what}: invalid shape {list(shape)}")
    need = math.prod(shape) * dtype.itemsize
    if len(body) != need:
        raise WireError(
            f"{what}: body has {len(body)} bytes, shape {list(shape)} of "
            f"{DTYPE_NAMES.get(dtype, dtype.name)} needs {need}"
        )
    return np.frombuffer(body, dtype=dtype).reshape(shape) if need else np.zeros(shape, dtype)


def dump_parts(
    tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None
) -> list[bytes | memoryview]:
    """A safetensors buffer in pieces: the header, then each tensor's data as a view of the
    array itself (no copy) where it is contiguous already. bfloat16 (uint16), float16 and
    uint8 (8-bit state's codes) arrays keep their type; anything else is written as float32.
    Keys keep their order."""
    arrays = [np.ascontiguousarray(a, dtype=file_dtype(a.dtype)) for a in tensors.values()]
    head = header_entries([(n, a.dtype, a.shape) for n, a in zip(tensors, arrays, strict=True)])
    parts: list[bytes | memoryview] = [dump_header(head, metadata)]
    for a in arrays:
        parts.append(a.reshape(-1).data.cast("B") if a.size else b"")
    return parts


def file_dtype(dtype: np.dtype) -> np.dtype:
    """The dtype an array of ``dtype`` is written as (see :func:`dump_parts`)."""
    return dtype if dtype in (BF16, F16, U8) else F32


def header_entries(
    entries: Sequence[tuple[str, np.dtype, tuple[int, ...]]],
) -> dict[str, Any]:
    """The header's tensor entries for ``(name, dtype, shape)`` laid out back to back, in
    order: known from shapes alone, before any byte of data is at hand."""
    header: dict[str, Any] = {}
    offset = 0
    for name, dtype, shape in entries:
        size = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[name] = {
            "dtype": ST_CODES[np.dtype(dtype)],
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    return header


def dump_header(entries: Mapping[str, Any], metadata: Mapping[str, str] | None) -> bytes:
    """The file's first bytes: the header length, then the JSON header (``entries`` from
    :func:`header_entries`), padded so the data starts 8-byte aligned."""
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    header.update(entries)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw


def dump(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> bytes:
    """One safetensors buffer (see :func:`dump_parts`)."""
    return b"".join(dump_parts(tensors, metadata))


def header_length(body: bytes | bytearray | memoryview) -> int:
    """The JSON header's length a safetensors buffer announces (0 if too short to say)."""
    return struct.unpack_from("<Q", body)[0] if len(body) >= 8 else 0


def parse(
    body: bytes | bytearray | memoryview,
    max_header: int = MAX_HEADER_BYTES,
    codes: tuple[str, ...] = ("F32",),
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Read-only views of a safetensors buffer, and its ``__metadata__``.

    Strict about everything (``WireError``): the header's JSON, each entry's keys, dtype
    (one of ``codes``: F32 only unless the caller takes more, e.g. :data:`GRAD_CODES`),
    shape and offsets, and no two tensors' data may overlap.
    """
    view = memoryview(body)
    if len(view) < 8:
        raise WireError("safetensors: body shorter than its 8-byte header length")
    (header_len,) = struct.unpack("<Q", view[:8])
    if header_len > len(view) - 8:
        raise WireError(f"safetensors: header length {header_len} exceeds the body")
    if header_len > max_header:
        raise WireError(f"safetensors: header of {header_len} bytes, more than {max_header}")
    data = view[8 + header_len :]
    specs, metadata = parse_header(view[8 : 8 + header_len], len(data), codes)
    tensors = {
        s.name: np.frombuffer(data[s.begin : s.end], dtype=s.dtype).reshape(s.shape) for s in specs
    }
    return tensors, metadata


class TensorSpec(NamedTuple):
    """One tensor of a safetensors header: its data lies at ``[begin, end)`` of the data
    section (after the 8 length bytes and the header)."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


def parse_header(
    raw: bytes | bytearray | memoryview, data_len: int, codes: tuple[str, ...] = ("F32",)
) -> tuple[list[TensorSpec], dict[str, str]]:
    """A safetensors JSON header checked as :func:`parse` checks it, against a data section
    of ``data_len`` bytes: the tensors in header order, and the ``__metadata__``. For
    readers that place the data themselves (a checkpoint read straight into its arrays)."""
    try:
        header = json.loads(bytes(raw))
    except ValueError as exc:  # not UTF-8, not JSON, or an int past Python's digit limit
        raise WireError(f"safetensors: header is not JSON: {exc}") from None
    except RecursionError:
        raise WireError("safetensors: header nested too deeply") from None
    if not isinstance(header, dict):
        raise WireError("safetensors: header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise WireError("safetensors: __metadata__ must map strings to strings")
    specs = []
    for name, info in header.items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise WireError(f"safetensors: entry {name!r} needs dtype, shape and data_offsets")
        if info["dtype"] not in codes:
            raise WireError(
                f"safetensors: {name!r} has dtype {info['dtype']!r}; only {', '.join(codes)}"
            )
        dtype = ST_DTYPES[info["dtype"]]
        shape, offsets = info["shape"], info["data_offsets"]
        if not (
            isinstance(shape, list)
            and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
        ):
            raise WireError(f"safetensors: {name!r} has an invalid shape {shape!r}")
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            and 0 <= offsets[0] <= offsets[1] <= data_len
        ):
            raise WireError(f"safetensors: {name!r} has invalid data_offsets {offsets!r}")
        begin, end = offsets
        if end - begin != math.prod(shape) * dtype.itemsize:
            raise WireError(
                f"safetensors: {name!r} spans {end - begin} bytes, shape {shape} needs "
                f"{math.prod(shape) * dtype.itemsize}"
            )
        specs.append(TensorSpec(name, dtype, tuple(shape), begin, end))
    spans = sorted((s.begin, s.end) for s in specs)
    for (_, end_a), (begin_b, _) in itertools.pairwise(spans):
        if begin_b < end_a:
            raise WireError("safetensors: tensor data regions overlap")
    return specs, metadata


# -- shm:// ----------------------------------------------------------------------------------

HEADER = struct.Struct("<HHI")  # op or status, 0, payload length
U32 = struct.Struct("<I")
U64 = struct.Struct("<Q")
F64 = struct.Struct("<d")
STEP_REPLY = struct.Struct("<QB")  # version, outcome (one of the three below)
STEP_SKIPPED, STEP_APPLIED, STEP_STALE = 0, 1, 2  # skipped: a non-finite gradient
SLOT_VERSION = struct.Struct("<IQ")  # slot, the version a gradient was computed from
MAX_PAYLOAD = 64 << 20  # every control message but LOAD_STATE (up to the body limit)


class Op(IntEnum):
    """shm:// requests; the payload, then ``->`` the reply's payload."""

    ATTACH = 1  # JSON {"segment": name, "bytes": n} -> u32 segment handle
    # JSON {name, shape, group, lr_scale, segment, shard} -> JSON {created, group, slot, version,
    # pages}; pages: how the server maps the segment, thp | 4k (stepd.hugepages)
    REGISTER = 2
    STEP = 3  # u32 slot -> STEP_REPLY
    STEP_BATCH = 4  # u32 n, n x u32 slot -> n x STEP_REPLY
    END_ITERATION = 5  # -> u64 global step, then JSON {"dropped": [...]} if a worker was
    SET_LR = 6  # f64 lr, UTF-8 group id -> nothing
    GET_LR_SCALE = 7  # UTF-8 name -> f64
    SET_LR_SCALE = 8  # f64 scale, UTF-8 name -> nothing
    GET_GROUP = 9  # UTF-8 group id -> JSON group info (with "lr")
    STATE = 10  # UTF-8 group id ("": global step only) -> u32 n, JSON (n bytes), raw slots
    CLOSE = 11  # -> nothing; the server then detaches everything and closes
    PING = 12  # -> nothing (a bare round trip)
    HELLO = 13  # JSON {run, anonymous, fresh, worker} -> JSON {run, protocol, limits}; first
    STEP_V = 14  # u32 n, n x SLOT_VERSION -> n x STEP_REPLY (async groups)
    LOAD_STATE = 15  # u32 k, group id (k bytes UTF-8), safetensors -> nothing
    HESSIAN = 16  # u32 slot -> nothing; Sophia's estimate, in the segment's gradient half
    SET_HYPERPARAMS = 17  # JSON {group, changes} -> JSON hyperparams now
    SET_VALUE = 18  # u32 slot -> nothing; the new value, in the segment's gradient half
    PULL = 19  # u32 n, n x u32 slot -> n x u64 version; each value, in its segment's param half
    # sync membership of the connection's worker -> JSON membership (JOIN: once a member)
    JOIN = 20
    LEAVE = 21
    HEARTBEAT = 22
    STEP_LAST = 23  # as STEP_BATCH, the worker's last gradients of the iteration (sync)
