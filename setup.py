"""Build: maps the `kernelmesh` namespace over the top-level folders, generates
the gRPC stubs and compiles the Cython core as part of every build."""

from __future__ import annotations

import glob
import os

from setuptools import Extension, find_packages, setup
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))
PROTO_ROOT = os.path.join(ROOT, "proto")
PROTO_PACKAGE = os.path.join(PROTO_ROOT, "kernelmesh", "v1")


def generate_stubs() -> None:
    """Writes *_pb2.py, *_pb2.pyi and *_pb2_grpc.py beside the .proto files."""
    import grpc_tools
    from grpc_tools import protoc

    wkt_include = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    protos = sorted(glob.glob(os.path.join(PROTO_PACKAGE, "*.proto")))
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{wkt_include}",
        f"--python_out={PROTO_ROOT}",
        f"--pyi_out={PROTO_ROOT}",
        f"--grpc_python_out={PROTO_ROOT}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed to generate the kernelmesh.v1 stubs")


class BuildPyWithStubs(build_py):
    def run(self) -> None:
        generate_stubs()
        super().run()


def extensions() -> list[Extension]:
    from Cython.Build import cythonize

    sources = sorted(glob.glob(os.path.join("native", "*.pyx")))
    exts = [
        Extension(
            "kernelmesh.native." + os.path.splitext(os.path.basename(src))[0],
            [src],
            language="c++",
            extra_compile_args=["-O3", "-std=c++17"],
        )
        for src in sources
    ]
    return cythonize(exts, language_level=3, compiler_directives={"embedsignature": True})


PACKAGE_DIR = {
    "kernelmesh.v1": "proto/kernelmesh/v1",
    "kernelmesh.core": "core",
    "kernelmesh.native": "native",
    "kernelmesh.services": "services",
    "kernelmesh.clients": "clients",
}


def packages() -> list[str]:
    """The mapped packages and every subpackage under them (core/llm -> kernelmesh.core.llm)."""
    found = []
    for package, folder in PACKAGE_DIR.items():
        found.append(package)
        found += [f"{package}.{sub}" for sub in find_packages(folder)]
    return found


setup(
    package_dir=PACKAGE_DIR,
    packages=packages(),
    package_data={
        "kernelmesh.v1": ["*.proto", "*.pyi"],
        "kernelmesh.native": ["kernels/*", "*.pyx"],
        # PEP 561: the client's type hints are part of its API.
        "kernelmesh.clients": ["py.typed"],
        "kernelmesh.services": ["static/*"],  # the dashboard: no build step, no CDN
    },
    ext_modules=extensions(),
    cmdclass={"build_py": BuildPyWithStubs},
)
