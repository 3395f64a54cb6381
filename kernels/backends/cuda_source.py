"""The CUDA translation unit as one self-contained string.

``#include "..."`` lines of ``csrc/cuda.cu`` are expanded in place so that the string CuPy
hashes for its kernel cache covers every header (an edit to a header must recompile), and
so that CI can hand exactly this string to NVRTC and nvcc on machines without a GPU.
"""

from __future__ import annotations

import re

from .build import CSRC

NVRTC_OPTIONS = ("-std=c++17", "--fmad=false")
_INCLUDE = re.compile(r'^#include "([^"]+)"\s*$', re.M)
_PRAGMA_ONCE = re.compile(r"^#pragma once\s*$", re.M)


def _expand(name: str, seen: set[str]) -> str:
    if name in seen:  # every header is `#pragma once`
        return ""
    seen.add(name)
    text = _PRAGMA_ONCE.sub("", (CSRC / name).read_text())  # inlined: `seen` does its job
    return _INCLUDE.sub(lambda m: _expand(m.group(1), seen), text)


def cuda_source() -> str:
    return _expand("cuda.cu", set())
