"""The CUDA kernel sources compile with nvcc, for every build `cuda.py` uses, to cubins for
two architectures, through the compiler class the backend itself uses. Needs nvcc (the
``nvidia-cuda-nvcc`` wheel will do), never a GPU or a driver.
"""

from __future__ import annotations

import pytest

from kernelmesh.native import cuda
from kernelmesh.native.backend import KERNEL_DIR, CompileError

# Ampere and Hopper: the data-centre GPUs a lent machine has; CUDA 13 builds sm_75 up.
ARCHS = ["sm_80", "sm_90"]
NVCC = cuda.find_nvcc()

pytestmark = pytest.mark.skipif(
    NVCC is None,
    reason="nvcc not found: set KERNELMESH_NVCC, put nvcc on PATH, or pip install nvidia-cuda-nvcc",
)

BUILDS = [
    pytest.param(kernel_file, variant, id=f"{kernel_file.file}-{variant}")
    for kernel_file in cuda.KERNELS.values()
    for variant in kernel_file.variants
]


def symbols(cubin: bytes) -> set[str]:
    """The kernel names in a cubin's string tables (every kernel we define starts km_)."""
    return {
        word.decode()
        for word in cubin.split(b"\0")
        if word.startswith(b"km_") and word.replace(b"_", b"").isalnum()
    }


def test_every_kernel_source_is_listed() -> None:
    on_disk = {path.name for path in KERNEL_DIR.glob("*.cu")}
    assert on_disk == set(cuda.KERNELS)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(("kernel_file", "variant"), BUILDS)
def test_source_compiles_to_a_cubin_with_its_kernels(
    kernel_file: cuda.KernelFile, variant: str, arch: str
) -> None:
    compiler = cuda.NvccCompiler(arch, NVCC)
    options = kernel_file.variants[variant]
    cubin = compiler.compile(kernel_file.path.read_text(), options, name=kernel_file.file)
    assert cubin[:4] == b"\x7fELF"
    assert symbols(cubin) == set(kernel_file.kernels[variant])


def test_a_compile_error_carries_nvccs_log() -> None:
    compiler = cuda.NvccCompiler(ARCHS[0], NVCC)
    source = 'extern "C" __global__ void km_broken(float* x) { x[0] = undefined_name; }\n'
    with pytest.raises(CompileError) as caught:
        compiler.compile(source, (), name="broken.cu")
    assert "undefined_name" in caught.value.log
    assert "broken.cu" in str(caught.value)


def test_nvcc_reports_its_version() -> None:
    major, minor = cuda.NvccCompiler(ARCHS[0], NVCC).version.split(".")
    assert major.isdigit() and minor.isdigit()


def test_kernelmesh_nvcc_overrides_the_search(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KERNELMESH_NVCC", NVCC)
    assert cuda.find_nvcc() == NVCC
    monkeypatch.setenv("KERNELMESH_NVCC", "/nonexistent/nvcc")
    assert cuda.find_nvcc() is None


def test_compiles_through_the_compile_cache(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kernelmesh.native.compile_cache import CompileCache

    cache = CompileCache(tmp_path)
    compiler = cuda.NvccCompiler(ARCHS[0], NVCC)
    kernel_file = cuda.KERNELS["cuda_fft.cu"]
    source = kernel_file.path.read_text()
    fingerprint = f"{ARCHS[0]}|nvcc {compiler.version}|driver test"
    first = cache.get_or_compile(
        cuda.NAME, fingerprint, source, (), lambda: compiler.compile(source), name="fft"
    )
    again = cache.get_or_compile(
        cuda.NAME, fingerprint, source, (), lambda: pytest.fail("compiled twice"), name="fft"
    )
    assert first == again and (cache.hits, cache.misses) == (1, 1)
