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
from collections.abc import Mapping
from enum import IntEnum

import numpy as np

PROTOCOL = 2  # 1: one global namespace per server; 2: runs

F32 = np.dtype("<f4")

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
SHAPE_HEADER = "x-stepd-shape"
OCTET = "application/octet-stream"
SAFETENSORS = "application/x-safetensors"


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
    body: bytes | bytearray | memoryview, shape: tuple[int, ...], what: str
) -> np.ndarray:
    """A read-only float32 view of ``body`` (no copy), checked against ``shape``."""
    if any(d < 0 for d in shape):
        raise WireError(f"{what}: invalid shape {list(shape)}")
    need = math.prod(shape) * 4
    if len(body) != need:
        raise WireError(
            f"{what}: body has {len(body)} bytes, shape {list(shape)} of float32 needs {need}"
        )
    return np.frombuffer(body, dtype=F32).reshape(shape) if need else np.zeros(shape, F32)


def dump_parts(
    tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None
) -> list[bytes | memoryview]:
    """A safetensors buffer in pieces: the header, then each tensor's data as a view of the
    array itself (no copy) where it is contiguous float32 already. Keys keep their order."""
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, arr in tensors.items():
        size = arr.size * 4
        span = [offset, offset + size]
        header[name] = {"dtype": "F32", "shape": list(arr.shape), "data_offsets": span}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
    parts: list[bytes | memoryview] = [struct.pack("<Q", len(raw)), raw]
    for a in tensors.values():
        a = np.ascontiguousarray(a, dtype=F32)
        parts.append(a.reshape(-1).data.cast("B") if a.size else b"")
    return parts


def dump(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> bytes:
    """One safetensors buffer of float32 arrays (see :func:`dump_parts`)."""
    return b"".join(dump_parts(tensors, metadata))


def header_length(body: bytes | bytearray | memoryview) -> int:
    """The JSON header's length a safetensors buffer announces (0 if too short to say)."""
    return struct.unpack_from("<Q", body)[0] if len(body) >= 8 else 0


def parse(
    body: bytes | bytearray | memoryview, max_header: int = MAX_HEADER_BYTES
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Read-only float32 views of a safetensors buffer, and its ``__metadata__``.

    Strict about everything (``WireError``): the header's JSON, each entry's keys, dtype
    (F32 only), shape and offsets, and no two tensors' data may overlap.
    """
    view = memoryview(body)
    if len(view) < 8:
        raise WireError("safetensors: body shorter than its 8-byte header length")
    (header_len,) = struct.unpack("<Q", view[:8])
    if header_len > len(view) - 8:
        raise WireError(f"safetensors: header length {header_len} exceeds the body")
    if header_len > max_header:
        raise WireError(f"safetensors: header of {header_len} bytes, more than {max_header}")
    try:
        header = json.loads(bytes(view[8 : 8 + header_len]))
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
    data = view[8 + header_len :]
    tensors: dict[str, np.ndarray] = {}
    spans = []
    for name, info in header.items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise WireError(f"safetensors: entry {name!r} needs dtype, shape and data_offsets")
        if info["dtype"] != "F32":
            raise WireError(f"safetensors: {name!r} has dtype {info['dtype']!r}; only F32")
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
            and 0 <= offsets[0] <= offsets[1] <= len(data)
        ):
            raise WireError(f"safetensors: {name!r} has invalid data_offsets {offsets!r}")
        begin, end = offsets
        if end - begin != math.prod(shape) * 4:
            raise WireError(
                f"safetensors: {name!r} spans {end - begin} bytes, shape {shape} needs "
                f"{math.prod(shape) * 4}"
            )
        spans.append((begin, end))
        tensors[name] = np.frombuffer(data[begin:end], dtype=F32).reshape(shape)
    spans.sort()
    for (_, end_a), (begin_b, _) in itertools.pairwise(spans):
        if begin_b < end_a:
            raise WireError("safetensors: tensor data regions overlap")
    return tensors, metadata


# -- shm:// ----------------------------------------------------------------------------------

HEADER = struct.Struct("<HHI")  # op or status, 0, payload length
U32 = struct.Struct("<I")
U64 = struct.Struct("<Q")
F64 = struct.Struct("<d")
STEP_REPLY = struct.Struct("<QB")  # version, applied
SLOT_VERSION = struct.Struct("<IQ")  # slot, the version a gradient was computed from
MAX_PAYLOAD = 64 << 20  # every control message but LOAD_STATE (up to the body limit)


class Op(IntEnum):
    """shm:// requests; the payload, then ``->`` the reply's payload."""

    ATTACH = 1  # JSON {"segment": name, "bytes": n} -> u32 segment handle
    # JSON {name, shape, group, lr_scale, segment, shard} -> JSON {created, group, slot, version}
    REGISTER = 2
    STEP = 3  # u32 slot -> STEP_REPLY
    STEP_BATCH = 4  # u32 n, n x u32 slot -> n x STEP_REPLY
    END_ITERATION = 5  # -> u64 global step
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
