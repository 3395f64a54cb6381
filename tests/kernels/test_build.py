"""Building the CPU kernels: cache, and a clear failure without a compiler."""

from __future__ import annotations

import ctypes
import re
import warnings

import pytest
from stepd.kernels.algorithms import ALGORITHMS, ElementwiseAlgorithm
from stepd.kernels.backends import build, get_backend
from stepd.kernels.backends.build import CSRC, KernelBuildError, build_cpu_library


def test_build_is_cached_by_source_hash(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("STEPD_CACHE_DIR", str(tmp_path))
    first = build_cpu_library()
    mtime = first.stat().st_mtime_ns
    assert build_cpu_library() == first
    assert first.stat().st_mtime_ns == mtime
    assert first.parent == tmp_path / "kernels"
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no temp files left


def test_bind_helper_is_cached_and_optional(tmp_path, monkeypatch) -> None:
    """csrc/bind.cpp (prepared step_batch layouts checked in C) is built once, like the
    kernels; without a compiler it is simply absent."""
    monkeypatch.setenv("STEPD_CACHE_DIR", str(tmp_path))
    first = build.build_bind_library()
    if first is None:
        pytest.skip("no Python.h here: prepared layouts are checked in Python")
    assert build.build_bind_library() == first
    assert [p.name for p in first.parent.iterdir()] == [first.name]
    assert hasattr(ctypes.PyDLL(str(first)), "stepd_bind_grads")
    monkeypatch.setattr(build, "find_compiler", lambda: None)
    assert build.build_bind_library() is None


def test_missing_compiler_is_a_clear_error(monkeypatch) -> None:
    monkeypatch.setattr(build, "find_compiler", lambda: None)
    with pytest.raises(KernelBuildError, match="no C\\+\\+ compiler found"):
        build_cpu_library()


def test_auto_falls_back_to_numpy_with_a_warning(monkeypatch) -> None:
    monkeypatch.setattr(build, "find_compiler", lambda: None)
    get_backend.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="using the NumPy reference path"):
            backend = get_backend("auto")
        assert backend.name == "reference"
        with pytest.raises(KernelBuildError):
            get_backend("cpu")
    finally:
        get_backend.cache_clear()
    monkeypatch.undo()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert get_backend("auto").name == "cpu"


def _args_fields(headers: str) -> dict[str, list[str]]:
    """Op struct name -> its Args field names, from `struct Args { float a, b; };` inside the
    op or `using Args = SomeArgs;` naming a top-level `struct SomeArgs { float ...; };`."""
    headers = re.sub(r"//[^\n]*", "", headers)
    bodies = dict(re.findall(r"struct (\w+) \{(.*?)\n\};", headers, re.S))

    def fields(text: str) -> list[str]:
        return re.findall(r"\b(\w+)\s*(?=[,;])", text)

    out = {}
    for name, body in bodies.items():
        if nested := re.search(r"struct Args \{(.*?)\};", body, re.S):
            out[name] = fields(nested.group(1))
        elif alias := re.search(r"using Args = (\w+);", body):
            out[name] = fields(bodies[alias.group(1)])
    return out


def test_python_op_args_match_the_cpp_structs() -> None:
    """Each Op's args tuple names the C++ Args fields in order (the layout is positional)."""
    structs = _args_fields("\n".join(h.read_text() for h in sorted(CSRC.glob("*.cuh"))))
    ops_list = (CSRC / "ops.cuh").read_text()
    kernel_to_struct = dict(re.findall(r"STEPD_OP\((\w+), stepd::(\w+)\)", ops_list))
    lib = ctypes.CDLL(str(get_backend("cpu").library_path))
    for cls in ALGORITHMS.values():
        if not issubclass(cls, ElementwiseAlgorithm):
            continue
        op = cls(cls.hyperparams()).op()
        struct = kernel_to_struct[op.name]
        assert list(op.args) == structs[struct], op.name
        assert getattr(lib, f"stepd_{op.name}_nargs")() == len(op.args)
        assert getattr(lib, f"stepd_{op.name}_nslots")() == len(op.slots)


def test_a_prebuilt_library_needs_no_compiler(monkeypatch, tmp_path) -> None:
    built = get_backend("cpu").library_path
    monkeypatch.setattr(build, "find_compiler", lambda: None)
    monkeypatch.setenv("STEPD_CPU_LIBRARY", str(built))
    assert build_cpu_library() == built
    monkeypatch.setenv("STEPD_CPU_LIBRARY", str(tmp_path / "missing.so"))
    with pytest.raises(KernelBuildError, match="is not a file"):
        build_cpu_library()


def test_a_prebuilt_bind_library_needs_no_compiler(monkeypatch, tmp_path) -> None:
    built = build.build_bind_library()
    if built is None:
        pytest.skip("no compiler or Python headers here to build the bind helper")
    monkeypatch.setattr(build, "find_compiler", lambda: None)
    monkeypatch.setenv("STEPD_BIND_LIBRARY", str(built))
    assert build.build_bind_library() == built
    # a missing one is no error: the Python path binds instead
    monkeypatch.setenv("STEPD_BIND_LIBRARY", str(tmp_path / "missing.so"))
    assert build.build_bind_library() is None
