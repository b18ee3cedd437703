"""CUDA backend: our kernels (``kernels/cuda_*.cu``) through pycuda, cuBLAS and cuFFT
through CuPy where they beat hand kernels.

- Compiler: ``nvcc --cubin`` in a subprocess, not ``pycuda.compiler``, so the sources
  compile (and are tested) on machines without a GPU or a driver. Cubins go through the
  shared compile cache, keyed by arch + nvcc version + driver version.
- Memory and launches: pycuda on the device's *primary* context, the one the CUDA
  runtime (and so CuPy) uses too, so both libraries see the same allocations.
- Every launch, copy and CuPy call goes to the legacy default stream. That stream orders
  pycuda's and CuPy's work against each other without events, and the synchronous
  device-to-host copy at the end of `run` waits for all of it. The price: the two worker
  threads of a device take turns on the GPU instead of overlapping.
- Without CuPy (or with a CuPy that cannot reach the driver), matmul and conv2d run on
  the tiled/direct kernels and fft on a radix-2 kernel, which refuses lengths that are
  not powers of two (`Device.refusal`).

Nothing here imports pycuda or CuPy at module level: ``available()`` must answer on any
machine.
"""

from __future__ import annotations

import functools
import math
import os
import shutil
import subprocess
import tempfile
import threading
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from kernelmesh.native import backend

__all__ = [
    "KERNELS",
    "NAME",
    "SUPPORTED_DTYPES",
    "CudaDevice",
    "NvccCompiler",
    "available",
    "devices",
    "find_nvcc",
]

NAME = "cuda"
INSTALL_HINT = "pip install 'kernelmesh[cuda]'"

# Every op of the catalog, for every dtype it is defined for, as on the CPU.
SUPPORTED_DTYPES: Mapping[str, frozenset[str]] = backend.CATALOG_DTYPES


def _typed(*names: str) -> dict[str, tuple[str, ...]]:
    return dict.fromkeys(("float32", "float64"), names)


_FLOAT_BUILDS = {
    "float32": ("-DKM_T=float", "-DKM_FLOAT"),
    "float64": ("-DKM_T=double", "-DKM_FLOAT"),
}
_INTEGER_BUILDS = {"int32": ("-DKM_T=int",), "int64": ("-DKM_T=long long",)}
_NUMERIC_BUILDS = {**_FLOAT_BUILDS, **_INTEGER_BUILDS}
_ELEMENTWISE_ALL = ("km_add", "km_sub", "km_mul", "km_relu")
_REDUCE = tuple(
    f"km_{op}_{layout}_{stage}"
    for layout in ("rows", "cols")
    for op, stage in (
        ("sum", "partial"),
        ("max", "partial"),
        ("sum", "final"),
        ("mean", "final"),
        ("max", "final"),
    )
)

# Every kernel this backend launches, by file and build. The source-compile test checks
# each build of each file holds exactly these names.
KERNELS: Mapping[str, backend.KernelFile] = backend.kernel_table(
    backend.KernelFile(
        "cuda_elementwise.cu",
        _NUMERIC_BUILDS,
        {
            **_typed(*_ELEMENTWISE_ALL, "km_div", "km_scale", "km_exp", "km_gelu"),
            **dict.fromkeys(_INTEGER_BUILDS, _ELEMENTWISE_ALL),
        },
    ),
    backend.KernelFile("cuda_reduce.cu", _NUMERIC_BUILDS, dict.fromkeys(_NUMERIC_BUILDS, _REDUCE)),
    backend.KernelFile("cuda_softmax.cu", _FLOAT_BUILDS, _typed("km_softmax")),
    backend.KernelFile("cuda_matmul.cu", _FLOAT_BUILDS, _typed("km_matmul_tiled")),
    backend.KernelFile(
        "cuda_transpose.cu",
        {"4": ("-DKM_BYTES=4",), "8": ("-DKM_BYTES=8",)},
        dict.fromkeys(("4", "8"), ("km_transpose",)),
    ),
    backend.KernelFile("cuda_conv2d.cu", _FLOAT_BUILDS, _typed("km_im2col", "km_conv2d_direct")),
    backend.KernelFile(
        "cuda_fft.cu",
        {"complex64": ()},
        {
            "complex64": (
                "km_fft_bitreverse",
                "km_fft_bitreverse_real",
                "km_fft_stage",
                "km_fft_scale",
            )
        },
    ),
)


# --------------------------------------------------------------------------
# Compiler
# --------------------------------------------------------------------------


def find_nvcc() -> str | None:
    """nvcc from $KERNELMESH_NVCC, else PATH, else the ``nvidia-cuda-nvcc`` wheel (CUDA 13
    ships nvcc at ``nvidia/cu13/bin/nvcc``), else $CUDA_HOME/bin; None when none is found."""
    explicit = os.environ.get("KERNELMESH_NVCC")
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    on_path = shutil.which("nvcc")
    if on_path:
        return on_path
    try:
        import nvidia  # the namespace package every nvidia-* wheel installs into
    except ImportError:
        nvidia = None
    if nvidia is not None:
        for root in nvidia.__path__:
            for candidate in sorted(Path(root).glob("cu*/bin/nvcc"), reverse=True):
                if os.access(candidate, os.X_OK):
                    return str(candidate)
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and os.access(Path(home) / "bin" / "nvcc", os.X_OK):
            return str(Path(home) / "bin" / "nvcc")
    return None


@functools.cache
def _nvcc_version(nvcc: str) -> str:
    """'13.5' from ``nvcc --version``'s "release 13.5, V13.5.37"."""
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=False)
    for line in out.stdout.splitlines():
        if "release" in line:
            return line.rsplit("release", 1)[1].split(",")[0].strip()
    raise backend.CompileError("nvcc --version", out.stdout + out.stderr)


class NvccCompiler(backend.Compiler):
    """CUDA C to a cubin for one arch (``sm_90``), by running nvcc."""

    def __init__(self, arch: str, nvcc: str | None = None) -> None:
        found = nvcc or find_nvcc()
        if found is None:
            raise FileNotFoundError(
                "nvcc not found: set KERNELMESH_NVCC, put nvcc on PATH, or "
                "pip install nvidia-cuda-nvcc"
            )
        self.nvcc = found
        self.arch = arch

    @property
    def version(self) -> str:
        return _nvcc_version(self.nvcc)

    def compile(
        self, source: str, options: Sequence[str] = (), *, name: str = "kernel.cu"
    ) -> bytes:
        with tempfile.TemporaryDirectory(prefix="kernelmesh-nvcc-") as tmp:
            src, out = Path(tmp) / Path(name).name, Path(tmp) / "out.cubin"
            src.write_text(source)
            # nvcc's defaults (no --use_fast_math) keep IEEE division and sqrt and no
            # flush-to-zero: results must match NumPy's
            cmd = [self.nvcc, "--cubin", f"-arch={self.arch}", "-O3", *options, "-o", out, src]
            result = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp, check=False)
            if result.returncode != 0 or not out.exists():
                raise backend.CompileError(
                    f"{name} ({' '.join(options)})", result.stderr + result.stdout
                )
            return out.read_bytes()


# --------------------------------------------------------------------------
# Discovery
# --------------------------------------------------------------------------


@functools.cache
def _driver() -> Any:
    """pycuda.driver, initialised once; raises ImportError or pycuda's own errors (and,
    raising, is not cached: the next call tries again)."""
    with warnings.catch_warnings():
        # pycuda warns before raising when libcuda is missing; the raise says it all
        warnings.simplefilter("ignore")
        import pycuda.driver as drv
    drv.init()
    return drv


def _version(encoded: int) -> str:
    """The CUDA encoding 12080 -> '12.8'."""
    return f"{encoded // 1000}.{encoded % 1000 // 10}"


def available() -> str | None:
    """None when CUDA devices can run here, else why not."""
    try:
        import pycuda  # noqa: F401
    except ImportError:
        return f"pycuda is not installed ({INSTALL_HINT})"
    try:
        drv = _driver()
    except ImportError as exc:  # pycuda's extension could not load libcuda
        return f"no CUDA driver (pycuda cannot load it: {exc})"
    except Exception as exc:  # pycuda.driver.Error from cuInit
        text = str(exc)
        if "no_device" in text.lower() or "no cuda-capable device" in text.lower():
            return "no CUDA device"
        return f"no CUDA driver ({text})"
    if drv.Device.count() == 0:
        return "no CUDA device"
    nvcc = find_nvcc()
    if nvcc is None:
        return (
            "nvcc not found (set KERNELMESH_NVCC, put nvcc on PATH or pip install nvidia-cuda-nvcc)"
        )
    driver = drv.get_driver_version()
    try:
        toolkit = _nvcc_version(nvcc)
    except (backend.CompileError, OSError) as exc:
        return f"nvcc at {nvcc} does not run: {exc}"
    # A cubin needs a driver of at least its toolkit's major version.
    if int(toolkit.split(".")[0]) > driver // 1000:
        return (
            f"nvcc {toolkit} ({nvcc}) builds for a newer CUDA than this driver supports "
            f"({_version(driver)}); set KERNELMESH_NVCC to an nvcc of CUDA {driver // 1000}"
        )
    return None


def devices() -> list[CudaDevice]:
    """Every CUDA device, by driver ordinal; empty when CUDA is not available."""
    if available() is not None:
        return []
    drv = _driver()
    return [CudaDevice(index) for index in range(drv.Device.count())]


def _cupy() -> tuple[Any, str | None]:
    """(cupy, None) when CuPy can run here, else (None, why not)."""
    try:
        import cupy

        cupy.cuda.runtime.getDeviceCount()  # raises when its runtime cannot use the driver
    except ImportError:
        return None, "CuPy is not installed"
    except Exception as exc:
        return None, f"CuPy cannot use this driver: {exc}"
    return cupy, None


# --------------------------------------------------------------------------
# Allocator and Program
# --------------------------------------------------------------------------


class CudaAllocator(backend.Allocator):
    """Device memory through pycuda; the caller has the device's context current."""

    def __init__(self, device_name: str) -> None:
        super().__init__()
        self.device_name = device_name

    def _alloc(self, nbytes: int) -> Any:
        drv = _driver()
        try:
            return drv.mem_alloc(nbytes)  # at least one byte: cuMemAlloc(0) is an error
        except drv.Error as exc:
            raise backend.OutOfDeviceMemory(
                f"{self.device_name}: cannot allocate {nbytes} bytes of device memory: {exc}"
            ) from exc

    def _free(self, buffer: Any) -> None:
        buffer.free()

    def _copyin(self, buffer: Any, host: np.ndarray) -> None:
        _driver().memcpy_htod(buffer, host)

    def _copyout(self, host: np.ndarray, buffer: Any) -> None:
        _driver().memcpy_dtoh(host, buffer)


class CudaProgram(backend.Program):
    """One kernel of a loaded cubin. `global_size` is the grid in blocks and `local_size`
    the block in threads, as CUDA counts them (tinygrad's convention)."""

    def __init__(self, module: Any, name: str) -> None:
        self.name = name
        self.function = module.get_function(name)

    def launch(self, args: tuple, size: backend.LaunchSize) -> float | None:
        grid = _dim3(size.global_size)
        block = _dim3(size.local_size or (1,))
        if not size.wait:
            self.function(*args, grid=grid, block=block)
            return None
        drv = _driver()
        start, end = drv.Event(), drv.Event()
        start.record()
        self.function(*args, grid=grid, block=block)
        end.record()
        end.synchronize()
        return start.time_till(end) / 1e3


def _dim3(sizes: Sequence[int]) -> tuple[int, int, int]:
    x, y, z = (*(int(v) for v in sizes), 1, 1, 1)[:3]
    return x, y, z


def _ptr(buffer: Any) -> np.uintp:
    """A kernel argument for a device pointer (pycuda packs np.uintp as a pointer)."""
    return np.uintp(int(buffer))


# --------------------------------------------------------------------------
# Device
# --------------------------------------------------------------------------

_THREADS = 256  # block size of the grid-stride kernels
# Elements of im2col columns staged at once: 256 MiB of float32, 512 of float64.
_IM2COL_BUDGET = 1 << 26


class CudaDevice(backend.Device):
    """One CUDA device: its primary context, its loaded kernels, and the ops on them."""

    kernels = KERNELS

    def __init__(self, index: int) -> None:
        drv = _driver()
        self.index = index
        self._device = drv.Device(index)
        major, minor = self._device.compute_capability()
        attr = drv.device_attribute
        self.sm_count = self._device.get_attribute(attr.MULTIPROCESSOR_COUNT)
        self.arch = f"sm_{major}{minor}"
        compiler = NvccCompiler(self.arch)
        driver = _version(drv.get_driver_version())
        super().__init__(
            backend.DeviceProperties(
                kind=NAME,
                index=index,
                model=self._device.name(),
                vendor="NVIDIA",
                driver_version=driver,
                compute_units=self.sm_count,
                max_work_group_size=self._device.get_attribute(attr.MAX_THREADS_PER_BLOCK),
                memory_total_bytes=self._device.total_memory(),
                supports_fp64=True,
                supports_fp16=(major, minor) >= (5, 3),
                features=(self.arch, f"nvcc {compiler.version}"),
                fingerprint=f"{self.arch}|nvcc {compiler.version}|driver {driver}",
            ),
            dict(SUPPORTED_DTYPES),
        )
        self.compiler = compiler
        self.allocator = CudaAllocator(self.name)
        self._lock = threading.Lock()  # guards the context
        self._context: Any = None
        self.cupy, self.cupy_missing = _cupy()

    # --- context, programs ------------------------------------------------

    @contextmanager
    def active(self) -> Iterator[None]:
        """Makes the primary context current on this thread; device errors become
        LaunchError."""
        drv = _driver()
        with self._lock:
            if self._context is None:
                self._context = self._device.retain_primary_context()
            context = self._context
        context.push()
        try:
            with self._cupy_device():
                yield
        except backend.LaunchError:
            raise
        except drv.Error as exc:
            raise backend.LaunchError(f"{self.name}: {type(exc).__name__}: {exc}") from exc
        except Exception as exc:
            if type(exc).__name__ == "OutOfMemoryError":  # CuPy's memory pool ran dry
                raise backend.OutOfDeviceMemory(f"{self.name}: CuPy: {exc}") from exc
            if type(exc).__module__.split(".")[0] in ("cupy", "cupy_backends"):
                raise backend.LaunchError(
                    f"{self.name}: CuPy: {type(exc).__name__}: {exc}"
                ) from exc
            raise
        finally:
            drv.Context.pop()

    @contextmanager
    def _cupy_device(self) -> Iterator[None]:
        if self.cupy is None:
            yield
            return
        with self.cupy.cuda.Device(self.index):
            yield

    def load(self, binary: bytes, options: Sequence[str]) -> Any:
        return _driver().module_from_buffer(binary)

    def program_of(self, loaded: Any, name: str) -> CudaProgram:
        return CudaProgram(loaded, name)

    def close(self) -> None:
        self.forget_programs()
        with self._lock:
            context, self._context = self._context, None
        if context is None:
            return
        if self.cupy is not None:
            context.push()
            try:
                with self.cupy.cuda.Device(self.index):
                    self.cupy.get_default_memory_pool().free_all_blocks()
                    self.cupy.fft.config.get_plan_cache().clear()
            finally:
                _driver().Context.pop()
        context.detach()  # releases our retain of the primary context

    def memory_available_bytes(self) -> int:
        with self.active():
            free, _total = _driver().mem_get_info()
        return int(free)

    def refusal(
        self, op: str, shapes: Sequence[tuple[int, ...]], params: Mapping[str, Any]
    ) -> str | None:
        if op == "fft" and self.cupy is None and shapes and shapes[0]:
            n = shapes[0][-1]
            if n & (n - 1):
                return (
                    f"fft on {self.name} needs a power-of-two length without CuPy's cuFFT "
                    f"({self.cupy_missing}), got {n}"
                )
        return None

    # --- running ----------------------------------------------------------

    def running(self, call: backend.OpCall) -> AbstractContextManager[None]:
        return self.active()

    def blocks(self, work: int, threads: int = _THREADS) -> int:
        # enough blocks to fill every SM several times over; grid-stride loops do the rest
        return max(1, min(-(-work // threads), self.sm_count * 32))


def _launch(
    call: backend.OpCall, file: str, variant: str, name: str, work: int, *args: Any
) -> None:
    """A grid-stride kernel over `work` items."""
    call.kernel(file, variant, name)(
        *args, global_size=(call.device.blocks(work),), local_size=(_THREADS,)
    )


# --------------------------------------------------------------------------
# Ops: each takes validated inputs, normalised params and the output's spec
# --------------------------------------------------------------------------


def _binary(name: str) -> backend.OpFn:
    def op(call: backend.OpCall) -> np.ndarray:
        (a, b), out = call.inputs, call.out
        (da, db), dout = call.upload_all(), call.alloc_out()
        steps = (np.int32(a.size != 1 or b.size == 1), np.int32(b.size != 1 or a.size == 1))
        # both one element, or full same-shape operands: steps (1, 1) reads element 0 too
        _launch(
            call,
            "cuda_elementwise.cu",
            out.dtype.name,
            f"km_{name}",
            out.size,
            _ptr(da),
            _ptr(db),
            _ptr(dout),
            np.int64(out.size),
            *steps,
        )
        return call.result(dout)

    return op


def _unary(name: str) -> backend.OpFn:
    def op(call: backend.OpCall) -> np.ndarray:
        x, out = call.x, call.out
        # the factor in x's dtype, as NumPy's x * factor computes it for a Python float
        extra = (out.dtype.type(call.params["factor"]),) if name == "scale" else ()
        dx, dout = call.upload(x), call.alloc_out()
        _launch(
            call,
            "cuda_elementwise.cu",
            out.dtype.name,
            f"km_{name}",
            out.size,
            _ptr(dx),
            _ptr(dout),
            np.int64(out.size),
            *extra,
        )
        return call.result(dout)

    return op


def _reduce(op: str) -> backend.OpFn:
    def run(call: backend.OpCall) -> np.ndarray:
        x = call.x
        plan = backend.reduction_plan(x, call.params, op)
        planes, n, cols = plan.planes, plan.n, plan.cols
        part_dtype = plan.acc_dtype
        stage = "max" if op == "max" else "sum"
        final = f"km_{op}_{'rows' if cols == 1 else 'cols'}_final"
        variant = x.dtype.name
        sm_count = call.device.sm_count
        dx, dout = call.upload(x), call.alloc_out()
        extra = (np.int64(n),) if op == "mean" else ()
        if cols == 1:
            # chunks of at least 4096 elements; enough of them to give every SM 4 blocks
            chunks = max(1, min(-(-n // 4096), -(-sm_count * 4 // planes)))
            chunk = -(-n // chunks)
            chunks = -(-n // chunk)
            part = call.alloc(planes * chunks * part_dtype.itemsize)
            call.kernel("cuda_reduce.cu", variant, f"km_{stage}_rows_partial")(
                _ptr(dx),
                _ptr(part),
                np.int64(planes),
                np.int64(n),
                np.int64(chunk),
                np.int64(chunks),
                global_size=(min(planes * chunks, 1 << 20),),
                local_size=(_THREADS,),
            )
            call.kernel("cuda_reduce.cu", variant, final)(
                _ptr(part),
                _ptr(dout),
                np.int64(planes),
                np.int64(chunks),
                *extra,
                global_size=(min(planes, 1 << 20),),
                local_size=(_THREADS,),
            )
        else:
            # one thread per (plane, chunk, column): split rows until the device is full
            target = sm_count * 2048
            chunks = max(1, min(-(-target // (planes * cols)), -(-n // 16)))
            chunk = -(-n // chunks)
            chunks = -(-n // chunk)
            part = call.alloc(planes * chunks * cols * part_dtype.itemsize)
            _launch(
                call,
                "cuda_reduce.cu",
                variant,
                f"km_{stage}_cols_partial",
                planes * chunks * cols,
                _ptr(dx),
                _ptr(part),
                np.int64(planes),
                np.int64(n),
                np.int64(cols),
                np.int64(chunk),
                np.int64(chunks),
            )
            _launch(
                call,
                "cuda_reduce.cu",
                variant,
                final,
                planes * cols,
                _ptr(part),
                _ptr(dout),
                np.int64(planes),
                np.int64(cols),
                np.int64(chunks),
                *extra,
            )
        return call.result(dout)

    return run


def _op_softmax(call: backend.OpCall) -> np.ndarray:
    x, out = call.x, call.out
    n = x.shape[-1]
    rows = out.size // n
    dx, dout = call.upload(x), call.alloc_out()
    threads = 1024 if n >= 4096 else 256 if n >= 256 else 32
    call.kernel("cuda_softmax.cu", out.dtype.name, "km_softmax")(
        _ptr(dx),
        _ptr(dout),
        np.int64(rows),
        np.int64(n),
        global_size=(min(rows, 1 << 20),),
        local_size=(threads,),
    )
    return call.result(dout)


def _op_matmul(call: backend.OpCall) -> np.ndarray:
    (a, b), out = call.inputs, call.out
    (da, db), dout = call.upload_all(), call.alloc_out()
    cp = call.device.cupy
    if cp is not None:
        cp.matmul(
            _as_cupy(cp, da, a.shape, out.dtype),
            _as_cupy(cp, db, b.shape, out.dtype),
            out=_as_cupy(cp, dout, out.shape, out.dtype),
        )
        return call.result(dout)
    m, k, n = a.shape[-2], a.shape[-1], b.shape[-1]
    batch = a.shape[0] if a.ndim == 3 else 1
    call.kernel("cuda_matmul.cu", out.dtype.name, "km_matmul_tiled")(
        _ptr(da),
        _ptr(db),
        _ptr(dout),
        np.int64(batch),
        np.int64(m),
        np.int64(n),
        np.int64(k),
        global_size=(-(-n // 32), min(-(-m // 32), 65535), min(batch, 65535)),
        local_size=(16, 16),
    )
    return call.result(dout)


def _op_transpose(call: backend.OpCall) -> np.ndarray:
    rows, cols = call.x.shape
    out = call.out
    dx, dout = call.upload(call.x), call.alloc_out()
    call.kernel("cuda_transpose.cu", str(out.dtype.itemsize), "km_transpose")(
        _ptr(dx),
        _ptr(dout),
        np.int64(rows),
        np.int64(cols),
        global_size=(min(-(-cols // 32), 1 << 16), min(-(-rows // 32), 1 << 15)),
        local_size=(32, 8),
    )
    return call.result(dout)


def _op_conv2d(call: backend.OpCall) -> np.ndarray:
    g, out = call.conv2d(), call.out
    n, o, window, pixels = g.n, g.o, g.window, g.oh * g.ow
    (dx, dw), dout = call.upload_all(), call.alloc_out()
    shape = [np.int64(v) for v in g.astuple()]
    variant = out.dtype.name
    cp = call.device.cupy
    if cp is None or window * pixels > _IM2COL_BUDGET:
        # without cuBLAS, or when one image's columns would not fit the budget
        _launch(
            call,
            "cuda_conv2d.cu",
            variant,
            "km_conv2d_direct",
            out.size,
            _ptr(dx),
            _ptr(dw),
            _ptr(dout),
            *shape,
        )
        return call.result(dout)
    images = max(1, min(n, _IM2COL_BUDGET // (window * pixels)))
    cols = call.alloc(images * window * pixels * out.dtype.itemsize)
    weights = _as_cupy(cp, dw, (o, window), out.dtype)
    result = _as_cupy(cp, dout, out.shape, out.dtype).reshape(n, o, pixels)
    for n0 in range(0, n, images):
        tile = min(images, n - n0)
        _launch(
            call,
            "cuda_conv2d.cu",
            variant,
            "km_im2col",
            tile * window * pixels,
            _ptr(dx),
            _ptr(cols),
            np.int64(n0),
            np.int64(tile),
            *shape,
        )
        staged = _as_cupy(cp, cols, (tile, window, pixels), out.dtype)
        cp.matmul(weights, staged, out=result[n0 : n0 + tile])
    return call.result(dout)


def _op_fft(call: backend.OpCall) -> np.ndarray:
    x, out = call.x, call.out
    inverse = bool(call.params.get("inverse", False))
    dx = call.upload(x)
    cp = call.device.cupy
    if cp is not None:
        transform = cp.fft.ifft if inverse else cp.fft.fft
        # cuFFT allocates its result from CuPy's pool; complex64 in, complex64 out
        signal = _as_cupy(cp, dx, x.shape, x.dtype.newbyteorder("="))
        result = transform(signal.astype(cp.complex64, copy=False), axis=-1)
        return np.ascontiguousarray(cp.asnumpy(result), dtype=np.complex64)
    n = x.shape[-1]
    batch = out.size // n
    log2n = n.bit_length() - 1
    dout = call.alloc_out()
    first = "km_fft_bitreverse_real" if x.dtype == np.float32 else "km_fft_bitreverse"
    _launch(
        call,
        "cuda_fft.cu",
        "complex64",
        first,
        out.size,
        _ptr(dx),
        _ptr(dout),
        np.int64(batch),
        np.int64(n),
        np.int32(log2n),
    )
    sign = np.float32(1.0 if inverse else -1.0)
    half = 1
    while half < n:
        _launch(
            call,
            "cuda_fft.cu",
            "complex64",
            "km_fft_stage",
            out.size // 2,
            _ptr(dout),
            np.int64(batch),
            np.int64(n),
            np.int64(half),
            sign,
        )
        half *= 2
    if inverse:
        _launch(
            call,
            "cuda_fft.cu",
            "complex64",
            "km_fft_scale",
            out.size,
            _ptr(dout),
            np.int64(out.size),
            np.float32(1.0 / n),
        )
    return call.result(dout)


CudaDevice.ops = backend.op_table(globals(), _binary, _unary, _reduce)


def _as_cupy(cp: Any, buffer: Any, shape: tuple[int, ...], dtype: np.dtype) -> Any:
    """A CuPy array over our pycuda allocation; no copy. The allocation stays owned (and
    freed) by the call's `CallBuffers`; CuPy only borrows it for the duration of one op."""
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    memory = cp.cuda.UnownedMemory(int(buffer), max(1, nbytes), buffer)
    return cp.ndarray(shape, dtype, cp.cuda.MemoryPointer(memory, 0))
