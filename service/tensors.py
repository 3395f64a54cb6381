"""Tensors on the wire and on disk: raw little-endian float32 bytes, and safetensors.

Everything is parsed and validated before it is used; a malformed body is a ``BadTensor``
(the API maps it to 422). No pickle anywhere.
"""

from __future__ import annotations

import itertools
import json
import math
import struct
from collections.abc import Mapping

import numpy as np

F32 = np.dtype("<f4")
_DTYPES = {"F32": F32}
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit


class BadTensor(ValueError):
    """A tensor body that does not match what it claims (length, dtype, header)."""


def from_bytes(
    body: bytes | bytearray | memoryview, shape: tuple[int, ...], what: str
) -> np.ndarray:
    """Zero-copy float32 view of ``body`` (read-only), checked against ``shape``."""
    if any(d < 0 for d in shape):
        raise BadTensor(f"{what}: invalid shape {list(shape)}")
    need = math.prod(shape) * 4
    if len(body) != need:
        raise BadTensor(
            f"{what}: body has {len(body)} bytes, shape {list(shape)} of float32 needs {need}"
        )
    return np.frombuffer(body, dtype=F32).reshape(shape) if need else np.zeros(shape, F32)


def parse_safetensors(body: bytes | memoryview) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Parse a safetensors buffer into read-only float32 views; strict about every offset."""
    view = memoryview(body)
    if len(view) < 8:
        raise BadTensor("safetensors: body shorter than its 8-byte header length")
    (header_len,) = struct.unpack("<Q", view[:8])
    if header_len > min(_MAX_HEADER, len(view) - 8):
        raise BadTensor(f"safetensors: header length {header_len} exceeds the body")
    try:
        header = json.loads(bytes(view[8 : 8 + header_len]))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadTensor(f"safetensors: header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise BadTensor("safetensors: header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise BadTensor("safetensors: __metadata__ must map strings to strings")
    data = view[8 + header_len :]
    tensors: dict[str, np.ndarray] = {}
    spans = []
    for name, info in header.items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise BadTensor(f"safetensors: entry {name!r} needs dtype, shape and data_offsets")
        dtype = _DTYPES.get(info["dtype"])
        if dtype is None:
            raise BadTensor(f"safetensors: {name!r} has dtype {info['dtype']!r}; only F32")
        shape, offsets = info["shape"], info["data_offsets"]
        if not (
            isinstance(shape, list)
            and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
        ):
            raise BadTensor(f"safetensors: {name!r} has an invalid shape {shape!r}")
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            and 0 <= offsets[0] <= offsets[1] <= len(data)
        ):
            raise BadTensor(f"safetensors: {name!r} has invalid data_offsets {offsets!r}")
        begin, end = offsets
        if end - begin != math.prod(shape) * dtype.itemsize:
            raise BadTensor(
                f"safetensors: {name!r} spans {end - begin} bytes, shape {shape} needs "
                f"{math.prod(shape) * dtype.itemsize}"
            )
        spans.append((begin, end))
        tensors[name] = np.frombuffer(data[begin:end], dtype=dtype).reshape(shape)
    spans.sort()
    for (_, end_a), (begin_b, _) in itertools.pairwise(spans):
        if begin_b < end_a:
            raise BadTensor("safetensors: tensor data regions overlap")
    return tensors, metadata


def dump_safetensors(
    tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None
) -> bytes:
    """Serialise float32 arrays (keys in the given order) into one safetensors buffer."""
    header: dict = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name, arr in tensors.items():
        size = arr.size * 4
        header[name] = {
            "dtype": "F32",
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
    parts = [struct.pack("<Q", len(raw)), raw]
    parts += [np.ascontiguousarray(a, dtype=F32).tobytes() for a in tensors.values()]
    return b"".join(parts)
