"""The OpenCL kernel sources against the backend's kernel table (`opencl.KERNELS`), the
same table warm-up reads: every ``.cl`` file is listed, and every build of every file
compiles on each OpenCL device here (PoCL in CI) to a program holding exactly the kernels
listed for it. Builds a device does not use (float64 without fp64) are skipped, saying so.
"""

from __future__ import annotations

import pytest

from kernelmesh.native import opencl
from kernelmesh.native.backend import KERNEL_DIR, kernel_source

_REASON = opencl.available()


def test_every_kernel_source_is_listed() -> None:
    on_disk = {path.name for path in KERNEL_DIR.glob("*.cl")}
    assert on_disk == set(opencl.KERNELS)


BUILDS = [
    pytest.param(kernel_file, variant, id=f"{kernel_file.file}-{variant}")
    for kernel_file in opencl.KERNELS.values()
    for variant in kernel_file.variants
]


@pytest.mark.skipif(_REASON is not None, reason=f"OpenCL unavailable: {_REASON}")
@pytest.mark.parametrize(("kernel_file", "variant"), BUILDS)
def test_each_build_compiles_to_exactly_its_kernels(kernel_file, variant) -> None:
    import backend_suite
    import pyopencl as cl

    for device in backend_suite.devices("opencl"):
        if not device.builds(kernel_file, variant):
            pytest.skip(f"{device.name} does not use the {variant} build")
        options = device.options(kernel_file, variant)
        binary = device.compiler.compile(
            kernel_source(kernel_file.file), options, name=kernel_file.file
        )
        program = device.load(binary, options)
        names = set(program.get_info(cl.program_info.KERNEL_NAMES).split(";"))
        assert names == set(kernel_file.kernels[variant])
