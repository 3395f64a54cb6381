"""The CUDA translation unit as one self-contained string, and its NVRTC build.

``#include "..."`` lines of ``csrc/cuda.cu`` are expanded in place so that one string (and
one cache key) covers every header, and so that CI can hand exactly this string to NVRTC and
nvcc on machines without a GPU.

:func:`build_module` compiles it with NVRTC itself rather than through
``cupy.RawModule(code=...)``: CuPy appends ``-ftz=true`` after the caller's options and
NVRTC takes the last one, so CuPy's build flushes subnormals to zero while the CPU build and
the NumPy reference keep them. CI's compile test calls :func:`build_module` too (with an
explicit arch), so what it checks is what the backend loads.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path

from .build import CSRC, KernelBuildError, cache_dir

# --ftz=false: subnormals kept, as on the CPU; --fmad=false: a*b+c rounds twice, as on the
# CPU (-ffp-contract=off) and in NumPy. The arch is added per device (compile_options).
NVRTC_OPTIONS = ("-std=c++17", "--fmad=false", "--ftz=false")
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


def compile_options(arch: str) -> list[str]:
    """NVRTC's options for ``arch`` (``compute_XX``: PTX, ``sm_XX``: a cubin), nothing else."""
    if not re.fullmatch(r"(compute|sm)_\d+a?", arch):
        raise ValueError(f"arch must be compute_XX or sm_XX, got {arch!r}")
    return [*NVRTC_OPTIONS, f"-arch={arch}"]


def device_arch(compute_capability: str, supported: tuple[int, ...]) -> str:
    """What to compile for a device of ``compute_capability`` ("90"): its own cubin when this
    NVRTC knows the arch, else PTX of the newest one it knows below it (the driver JITs it)."""
    cc = int(compute_capability)
    if cc in supported:
        return f"sm_{cc}"
    older = [a for a in supported if a < cc]
    if not older:
        raise KernelBuildError(f"NVRTC supports no arch at or below sm_{cc}: {supported}")
    return f"compute_{max(older)}"


def build_module(arch: str, cache: Path | None = None) -> Path:
    """The kernels compiled by NVRTC for ``arch`` with exactly :func:`compile_options`: a
    PTX (``compute_XX``) or cubin (``sm_XX``) file, cached under ``cache`` (default
    ``$STEPD_CACHE_DIR/kernels/cuda``) by a hash of the source, the options and NVRTC's
    version. Concurrent first builds race safely (private temporary, atomic rename)."""
    try:
        from cupy_backends.cuda.libs import nvrtc
    except ImportError as exc:
        raise KernelBuildError(f"CuPy's NVRTC binding is not installed: {exc}") from None
    source, options = cuda_source(), compile_options(arch)
    try:
        version = nvrtc.getVersion()
    except Exception as exc:  # libnvrtc missing
        raise KernelBuildError(f"NVRTC unavailable: {exc}") from None
    key = hashlib.sha256("\0".join([source, *options, repr(version)]).encode()).hexdigest()
    cubin = arch.startswith("sm_")
    folder = cache if cache is not None else cache_dir() / "cuda"
    out = folder / f"stepd-{arch}-{key[:20]}.{'cubin' if cubin else 'ptx'}"
    if out.exists():
        return out
    prog = nvrtc.createProgram(source, "stepd.cu", [], [])
    try:
        try:
            nvrtc.compileProgram(prog, options)
        except nvrtc.NVRTCError as exc:
            log = nvrtc.getProgramLog(prog)
            raise KernelBuildError(f"NVRTC rejected the kernels: {exc}\n{log}") from None
        binary = nvrtc.getCUBIN(prog) if cubin else nvrtc.getPTX(prog).rstrip(b"\0")
    finally:
        nvrtc.destroyProgram(prog)
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=out.suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(binary)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out
