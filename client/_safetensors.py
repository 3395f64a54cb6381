"""A tiny float32-only safetensors codec (the client must not import the server's).

The format: an 8-byte little-endian header length, a JSON header mapping each name to
``{"dtype", "shape", "data_offsets"}`` (plus an optional ``__metadata__`` of strings), then
the raw little-endian data. Parsing checks every offset before building a view.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping

import numpy as np

F32 = np.dtype("<f4")


def dump(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> bytes:
    """Serialise float32 arrays (keys in the given order) into one safetensors buffer."""
    return b"".join(dump_parts(tensors, metadata))


def dump_parts(
    tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None
) -> list[bytes | memoryview]:
    """The pieces of :func:`dump`'s buffer, the tensors' data as views of the arrays
    themselves (no copy) where they are contiguous float32 already."""
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, arr in tensors.items():
        size = arr.size * 4
        offsets = [offset, offset + size]
        header[name] = {"dtype": "F32", "shape": list(arr.shape), "data_offsets": offsets}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
    parts: list[bytes | memoryview] = [struct.pack("<Q", len(raw)), raw]
    for a in tensors.values():
        a = np.ascontiguousarray(a, dtype=F32)
        parts.append(memoryview(a.reshape(-1)).cast("B") if a.size else b"")
    return parts


def parse(body: bytes) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Read-only float32 views of a safetensors buffer, and its ``__metadata__``.

    Raises ``ValueError`` on anything malformed (the caller maps it to a transport error).
    """
    view = memoryview(body)
    if len(view) < 8:
        raise ValueError("safetensors reply shorter than its 8-byte header length")
    (n,) = struct.unpack("<Q", view[:8])
    if n > len(view) - 8:
        raise ValueError(f"safetensors header length {n} exceeds the reply")
    header = json.loads(bytes(view[8 : 8 + n]))
    if not isinstance(header, dict):
        raise ValueError("safetensors header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    data = view[8 + n :]
    out: dict[str, np.ndarray] = {}
    for name, info in header.items():
        if not isinstance(info, dict) or info.get("dtype") != "F32":
            raise ValueError(f"safetensors entry {name!r} is not F32")
        shape, (begin, end) = info["shape"], info["data_offsets"]
        if not (0 <= begin <= end <= len(data)) or end - begin != math.prod(shape) * 4:
            raise ValueError(f"safetensors entry {name!r} has bad offsets {[begin, end]}")
        out[name] = np.frombuffer(data[begin:end], dtype=F32).reshape(shape)
    return out, meta
