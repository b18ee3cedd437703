"""The Metal kernel sources against what `metal.py` expects of them, on any OS.

CI has no Mac, so these catch drift between the host code and the ``.metal`` files
without one: every kernel the backend may launch is defined in the file it is loaded
from, every file defines exactly the kernels listed for it, every op the CPU backend runs
(less float64) has a Metal path, and the argument structs hold only the 4-byte fields the
host packs without padding. The sources are also type-checked as C++ against a small
stand-in for ``metal_stdlib`` where a C++ compiler exists (a check of syntax and
templates, not of Metal's own rules), and compiled by Xcode's ``xcrun metal`` where it
runs (macOS).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kernelmesh.native import cpu, metal
from kernelmesh.native.backend import KERNEL_DIR

SOURCES = sorted(KERNEL_DIR.glob("metal_*.metal"))

# INSTANTIATE("host_name", template, args...): every kernel is an explicit instantiation
_INSTANTIATION = re.compile(r'^\s*INSTANTIATE\(\s*"(\w+)"', re.MULTILINE)
# a kernel that is no template instantiation would be callable under its own name
_PLAIN_KERNEL = re.compile(r"^(?!\s*template)[^\n]*\bkernel\s+void\s+(\w+)\s*\(", re.MULTILINE)
_ARGS_STRUCT = re.compile(r"struct\s+(\w+Args)\s*\{(.*?)\};", re.DOTALL)


def _strip_comments(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.DOTALL)
    return re.sub(r"//[^\n]*", "", text)


def defined_kernels(path: Path) -> list[str]:
    text = _strip_comments(path.read_text(encoding="utf-8"))
    return _INSTANTIATION.findall(text) + _PLAIN_KERNEL.findall(text)


def _listed(file: str) -> list[str]:
    """Every kernel the backend's table lists for `file`, over all its builds."""
    return [name for names in metal.KERNELS[file].kernels.values() for name in names]


def test_every_source_file_is_listed_and_every_listed_file_exists():
    assert sorted(p.name for p in SOURCES) == sorted(metal.KERNELS)


@pytest.mark.parametrize("path", SOURCES, ids=[p.name for p in SOURCES])
def test_each_file_defines_exactly_the_kernels_listed_for_it(path):
    names = defined_kernels(path)
    assert len(names) == len(set(names)), f"a kernel name is defined twice in {path.name}"
    assert sorted(names) == sorted(_listed(path.name))


def test_every_kernel_the_backend_launches_is_defined_in_its_file():
    defined = {name: path.name for path in SOURCES for name in defined_kernels(path)}
    for op, by_dtype in metal.OP_KERNELS.items():
        for dtype, kernels in by_dtype.items():
            assert kernels, f"{op} on {dtype} has no kernel"
            for kernel in kernels:
                assert kernel in defined, f"{op} on {dtype} launches {kernel}, defined nowhere"
                assert _listed(defined[kernel]).count(kernel) == 1


def test_every_cpu_op_has_a_metal_path_for_every_dtype_but_float64():
    for op, dtypes in cpu.SUPPORTED_DTYPES.items():
        expected = dtypes - {"float64"}
        assert metal.SUPPORTED_DTYPES.get(op) == expected, op
        assert set(metal.OP_KERNELS[op]) == expected, op
    float32_ops = {op for op, dtypes in cpu.SUPPORTED_DTYPES.items() if "float32" in dtypes}
    assert float32_ops <= {op for op, d in metal.OP_KERNELS.items() if "float32" in d}


def test_no_op_is_offered_for_float64():
    assert all("float64" not in dtypes for dtypes in metal.SUPPORTED_DTYPES.values())


def test_every_op_has_a_host_function():
    assert set(metal.MetalDevice.ops) == set(metal.SUPPORTED_DTYPES)


@pytest.mark.parametrize("path", SOURCES, ids=[p.name for p in SOURCES])
def test_argument_structs_hold_only_4_byte_fields(path):
    # The host packs arguments as consecutive 4-byte values (struct "=I", float32); a
    # 64-bit or vector field would shift or pad the layout the kernel reads.
    text = _strip_comments(path.read_text(encoding="utf-8"))
    for name, body in _ARGS_STRUCT.findall(text):
        for field in filter(None, (f.strip() for f in body.split(";"))):
            assert field.split()[0] in ("uint", "float"), f"{path.name}: {name}.{field}"


def test_importing_the_module_needs_no_metal_and_says_why_it_cannot_run():
    if sys.platform == "darwin":
        pytest.skip("on macOS Metal may well be available")
    assert metal.available() == "Metal runs only on macOS (this is Linux)" or (
        sys.platform != "linux" and "only on macOS" in (metal.available() or "")
    )
    assert metal.devices() == []
    assert metal.offline_toolchain() is None


# --------------------------------------------------------------------------
# Compiling the sources
# --------------------------------------------------------------------------

# Just enough of metal_stdlib, in C++, for the kernels to type-check: address spaces
# vanish, attributes are ignored, vector types are plain structs. It checks syntax and
# template instantiation (a misspelled member, a wrong argument count), not Metal's own
# rules; extend it when a kernel uses more of the standard library.
_MSL_STAND_IN = r"""
#pragma once
#include <cmath>
#include <cstring>
#define kernel
#define device
#define constant
#define threadgroup
#define thread
typedef unsigned int uint;
typedef unsigned long ulong;
struct float2 {
  float x, y;
  float2() {}
  float2(float a, float b) : x(a), y(b) {}
};
inline float2 operator+(float2 a, float2 b) { return float2(a.x + b.x, a.y + b.y); }
inline float2 operator-(float2 a, float2 b) { return float2(a.x - b.x, a.y - b.y); }
inline float2 operator*(float2 a, float s) { return float2(a.x * s, a.y * s); }
struct uint2 { uint x, y; };
namespace metal {
template <typename T, typename U> T as_type(U u) {
  static_assert(sizeof(T) == sizeof(U), "as_type needs equal sizes");
  T t;
  std::memcpy(&t, &u, sizeof t);
  return t;
}
using std::fabs;
using std::fma;
using std::isfinite;
using std::isnan;
namespace precise {
inline float exp(float x) { return std::exp(x); }
inline float cospi(float x) { return std::cos(x * 3.14159265f); }
inline float sinpi(float x) { return std::sin(x * 3.14159265f); }
}  // namespace precise
enum class mem_flags { mem_threadgroup };
inline void threadgroup_barrier(mem_flags) {}
}  // namespace metal
"""


# Attributes are MSL's ([[buffer(0)]], [[host_name(...)]]); any other warning fails.
_CXX_FLAGS = ("-std=c++17", "-fsyntax-only", "-Wall", "-Werror", "-Wno-attributes")
_CXX_FLAGS += ("-Wno-unknown-attributes", "-Wno-unknown-warning-option", "-Wno-unused")


def _cxx() -> str | None:
    return shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")


@pytest.mark.parametrize("path", SOURCES, ids=[p.name for p in SOURCES])
def test_sources_type_check_as_cpp_against_a_stand_in_for_metal_stdlib(path, tmp_path):
    compiler = _cxx()
    if compiler is None:
        pytest.skip("no C++ compiler (c++, g++ or clang++) on PATH")
    (tmp_path / "metal_stdlib").write_text(_MSL_STAND_IN, encoding="utf-8")
    result = subprocess.run(
        [compiler, *_CXX_FLAGS, "-I", str(tmp_path), "-x", "c++", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("path", SOURCES, ids=[p.name for p in SOURCES])
def test_sources_compile_with_xcrun_metal(path):
    if metal.offline_toolchain() is None:
        pytest.skip("no runnable offline Metal toolchain (xcrun metal and metallib: macOS + Xcode)")
    source = path.read_text(encoding="utf-8")
    binary = metal.MetalCompiler().compile(source, metal._OFFLINE_OPTIONS, name=path.name)
    assert binary[:4] == b"MTLB"  # the metallib magic
