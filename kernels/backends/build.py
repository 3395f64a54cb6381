"""Builds ``csrc/cpu.cpp`` into a shared library with the host compiler, once per source.

The library is cached under ``$STEPD_CACHE_DIR`` (default ``~/.cache/stepd``) by a hash of
the sources, the flags, the compiler's version and the CPU's feature flags (``-march=native``
makes a build machine-specific). Concurrent first uses race safely: each compiles to a
private temporary file and ``os.replace`` publishes it atomically.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

CSRC = Path(__file__).resolve().parent.parent / "csrc"

# -fno-math-errno lets sqrtf vectorise; -ffp-contract=off keeps a*b+c as two roundings, as
# on the GPU (--fmad=false) and in NumPy, so all three agree bit for bit.
CXXFLAGS = (
    "-O3",
    "-std=c++17",
    "-fopenmp",
    "-fPIC",
    "-shared",
    "-fno-math-errno",
    "-ffp-contract=off",
)
NATIVE = "-march=native"


class KernelBuildError(RuntimeError):
    """The CPU kernels could not be compiled (no compiler, or it failed)."""


def find_compiler() -> str | None:
    for candidate in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if candidate and shutil.which(candidate):
            return candidate
    return None


def cache_dir() -> Path:
    root = os.environ.get("STEPD_CACHE_DIR") or Path.home() / ".cache" / "stepd"
    return Path(root) / "kernels"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    import platform

    return platform.machine()


def _sources() -> list[Path]:
    return sorted([*CSRC.glob("*.cuh"), CSRC / "cpu.cpp"])


def _build_key(compiler: str, flags: tuple[str, ...]) -> str:
    h = hashlib.sha256()
    for path in _sources():
        h.update(path.name.encode())
        h.update(path.read_bytes())
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    h.update(" ".join((version, *flags, _cpu_flags())).encode())
    return h.hexdigest()[:16]


def build_cpu_library() -> Path:
    """Path of the compiled CPU kernels, compiling them first if no cached build matches.

    ``$STEPD_CPU_LIBRARY`` names a library built beforehand from the same sources (the
    container image's, compiled in its build stage): it is used as is, no compiler needed.
    """
    prebuilt = os.environ.get("STEPD_CPU_LIBRARY")
    if prebuilt:
        if not Path(prebuilt).is_file():
            raise KernelBuildError(f"$STEPD_CPU_LIBRARY={prebuilt} is not a file")
        return Path(prebuilt)
    compiler = find_compiler()
    if compiler is None:
        raise KernelBuildError(
            "no C++ compiler found (tried $CXX, g++, c++, clang++); install one to use the "
            "fused CPU kernels"
        )
    errors = []
    for flags in ((*CXXFLAGS, NATIVE), CXXFLAGS):  # some compilers reject -march=native
        target = cache_dir() / f"libstepd_cpu-{_build_key(compiler, flags)}.so"
        if target.exists():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        cmd = [compiler, *flags, str(CSRC / "cpu.cpp"), "-o", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode == 0:
            os.replace(tmp, target)
            return target
        os.unlink(tmp)
        errors.append(f"$ {' '.join(cmd)}\n{proc.stderr.strip()}")
    raise KernelBuildError("compiling the CPU kernels failed:\n" + "\n".join(errors))


def build_bind_library() -> Path | None:
    """Path of ``csrc/bind.cpp`` compiled against this Python's headers (cached like the
    kernels), or None where it cannot be built: it is an optional speed-up, and the
    Python path does the same work. ``$STEPD_BIND_LIBRARY`` names one built beforehand
    (an image without a compiler)."""
    import sysconfig

    prebuilt = os.environ.get("STEPD_BIND_LIBRARY")
    if prebuilt:
        return Path(prebuilt) if Path(prebuilt).is_file() else None
    compiler = find_compiler()
    include = sysconfig.get_paths().get("include")
    if compiler is None or not include or not (Path(include) / "Python.h").is_file():
        return None
    source = CSRC / "bind.cpp"
    flags = ("-O2", "-std=c++17", "-fPIC", "-shared", f"-I{include}")
    h = hashlib.sha256(source.read_bytes())
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    h.update(" ".join((version, *flags, str(sysconfig.get_config_var("SOABI")))).encode())
    target = cache_dir() / f"libstepd_bind-{h.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    proc = subprocess.run([compiler, *flags, str(source), "-o", tmp], capture_output=True)
    if proc.returncode != 0:
        os.unlink(tmp)
        return None
    os.replace(tmp, target)
    return target
