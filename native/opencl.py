"""OpenCL backend: pyopencl on any OpenCL device, PoCL (CPU OpenCL) in CI.

Four small classes in the spirit of tinygrad's ``runtime/ops_cl.py``: `OpenCLAllocator`
(buffers and copies), `OpenCLCompiler` (source to program binary), `OpenCLProgram` (one
kernel of a loaded binary) and `OpenCLDevice` (one context and in-order queue, running
catalog ops through the per-op host functions at the bottom of this file).

Kernel sources are the files ``kernels/opencl_*.cl``, specialised per dtype with build
options (``-D T=float``). Each (file, options) pair is built from source once per device
fingerprint and its binary kept in the shared compile cache, so a second process only
loads binaries.

Finding PoCL: the pyopencl wheel bundles an ICD loader that also looks in its own
``.libs`` folder, where the ``pocl-binary-distribution`` wheel's PoCL is registered, so
``pip install pyopencl pocl-binary-distribution`` is enough: no ``OCL_ICD_VENDORS`` to
set. System ICDs (``/etc/OpenCL/vendors``) are found as well.

Semantics follow the CPU backend (``cpu.py``) op for op: output dtypes (integer sums to
int64, integer means to float64), nan propagation in max, IEEE division by zero. Sums of
floats accumulate in float64 when the device has fp64. On a device without it they
accumulate in float32 (per work-item running sums over strided slices, then a tree, so
far more accurate than one running sum, yet short of float64), and float64 ops and the
integer means (a float64 output) are not offered; no such device has been tested yet.

Threads: `OpenCLDevice.run` may be called from several threads at once. OpenCL's enqueue
calls are thread-safe; a kernel object's arguments are not, so each thread gets its own
kernel objects (`OpenCLProgram`), and every call waits for its own results with a
blocking read. Programs are loaded under a lock.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from kernelmesh.native import backend
from kernelmesh.native.backend import KernelFile, OpCall, OpFn

try:
    import pyopencl as cl
except ImportError as exc:  # reported by available(), never raised at import
    cl = None
    _IMPORT_ERROR: str | None = f"pyopencl is not installed ({exc})"
else:
    _IMPORT_ERROR = None

__all__ = [
    "NAME",
    "OpenCLAllocator",
    "OpenCLCompiler",
    "OpenCLDevice",
    "OpenCLProgram",
    "available",
    "devices",
]

NAME = "opencl"

# Work-group size of the reduction and softmax kernels (a power of two). GPUs want wide
# groups to hide latency; on a CPU device (PoCL) each barrier costs a pass over the
# group's work-items, and 16 ran softmax 1.5x and partial sums 1.8x faster than 256.
_REDUCE_LOCAL_GPU = 256
_REDUCE_LOCAL_CPU = 16
# Work-items per group of the 1-D elementwise kernels (the global size is rounded up).
_ELEMENTWISE_LOCAL = 256
# im2col columns built at once (elements): bounds conv2d's scratch buffer to 64 MiB of
# float32, as cpu.py's budget does.
_IM2COL_BUDGET = 1 << 24

_CL_TYPES = {"float32": "float", "float64": "double", "int32": "int", "int64": "long"}
_INTEGERS = frozenset({"int32", "int64"})

# Each dtype build names its element type; integer builds also their unsigned twin (for
# wrapping arithmetic) and their least value (the identity of max).
_TYPED_BUILDS = {
    "float32": ("-DT=float",),
    "float64": ("-DT=double",),
    "int32": ("-DT=int", "-DINTEGER", "-DUT=uint", "-DT_MIN=INT_MIN"),
    "int64": ("-DT=long", "-DINTEGER", "-DUT=ulong", "-DT_MIN=LONG_MIN"),
}
_FLOAT_BUILDS = {dtype: _TYPED_BUILDS[dtype] for dtype in ("float32", "float64")}
_BINARY = ("add", "sub", "mul")
_INTEGER_ELEMENTWISE = (*(f"{op}_{v}" for op in _BINARY for v in ("tt", "ts", "st")), "relu")
_FLOAT_ELEMENTWISE = (
    *_INTEGER_ELEMENTWISE,
    *(f"div_{v}" for v in ("tt", "ts", "st")),
    "scale",
    "exp_",
    "gelu",
)
_INTEGER_REDUCE = ("partial_sum", "partial_max", "finish_sum", "finish_mean", "finish_max")


def _by_dtype(floats: tuple[str, ...], integers: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    return {d: integers if d in _INTEGERS else floats for d in _TYPED_BUILDS}


# Every kernel this backend launches, by file and build (see `backend.KernelFile`).
KERNELS: Mapping[str, KernelFile] = backend.kernel_table(
    KernelFile(
        "opencl_elementwise.cl",
        _TYPED_BUILDS,
        _by_dtype(_FLOAT_ELEMENTWISE, _INTEGER_ELEMENTWISE),
    ),
    KernelFile(
        "opencl_reduce.cl", _TYPED_BUILDS, _by_dtype((*_INTEGER_REDUCE, "softmax"), _INTEGER_REDUCE)
    ),
    KernelFile("opencl_matmul.cl", _FLOAT_BUILDS, dict.fromkeys(_FLOAT_BUILDS, ("matmul",))),
    KernelFile("opencl_conv2d.cl", _FLOAT_BUILDS, dict.fromkeys(_FLOAT_BUILDS, ("im2col",))),
    KernelFile(
        "opencl_transpose.cl",
        {"4": ("-DT=uint",), "8": ("-DT=ulong",)},
        dict.fromkeys(("4", "8"), ("transpose",)),
    ),
    KernelFile("opencl_fft.cl", {"complex64": ()}, {"complex64": ("radix2", "real_to_complex")}),
)


def available() -> str | None:
    """None when at least one OpenCL device can be used here, else why not."""
    if cl is None:
        return _IMPORT_ERROR
    try:
        found = [d for p in cl.get_platforms() for d in p.get_devices()]
    except cl.Error as exc:
        return f"no OpenCL platform found ({exc}); install pocl-binary-distribution or a GPU driver"
    if not found:
        return "OpenCL platforms are installed but none has a device"
    return None


def devices() -> list[OpenCLDevice]:
    """Every OpenCL device, platform by platform, each with its own context and queue."""
    if available() is not None:
        return []
    found = [d for p in cl.get_platforms() for d in p.get_devices()]
    return [OpenCLDevice.open(index, device) for index, device in enumerate(found)]


# --------------------------------------------------------------------------
# Allocator, compiler, program
# --------------------------------------------------------------------------


class OpenCLAllocator(backend.PooledAllocator):
    """Device buffers through the shared pool (see `backend.PooledAllocator`: on PoCL a
    fresh buffer costs its first touch), up to an eighth of the device's memory or
    256 MiB.

    OpenCL has no portable query for free device memory, so `held` (live plus pooled
    bytes) is what this backend allocated and has not released; other processes' use
    is invisible.
    """

    device_name = "the OpenCL device"

    def __init__(self, context: Any, queue: Any, device: Any) -> None:
        super().__init__(
            max_alloc=int(device.max_mem_alloc_size),
            pool_limit=min(256 << 20, int(device.global_mem_size) // 8),
        )
        self.context, self.queue = context, queue

    def _alloc(self, nbytes: int) -> Any:
        try:
            return cl.Buffer(self.context, cl.mem_flags.READ_WRITE, nbytes)
        except cl.Error as exc:
            raise backend.OutOfDeviceMemory(f"cannot allocate {nbytes} bytes: {exc}") from exc

    def _free(self, buffer: Any) -> None:
        buffer.release()

    def _copyin(self, buffer: Any, host: np.ndarray) -> None:
        cl.enqueue_copy(self.queue, buffer, host, is_blocking=True)

    def _copyout(self, host: np.ndarray, buffer: Any) -> None:
        cl.enqueue_copy(self.queue, host, buffer, is_blocking=True)


class OpenCLCompiler(backend.Compiler):
    """OpenCL C source to the device's program binary."""

    def __init__(self, context: Any, device: Any) -> None:
        self.context, self.device = context, device

    def compile(self, source: str, options: Sequence[str] = (), *, name: str = "kernel") -> bytes:
        program = cl.Program(self.context, source)
        try:
            # cache_dir=False: pyopencl's own source cache stays out of the way; ours
            # (compile_cache) keys on the device fingerprint and stores the binary
            program.build(list(options), devices=[self.device], cache_dir=False)
        except cl.Error as exc:
            raise backend.CompileError(f"{name} ({' '.join(options)})", str(exc)) from exc
        (binary,) = program.get_info(cl.program_info.BINARIES)
        return bytes(binary)


class OpenCLProgram(backend.Program):
    """One kernel of a loaded program binary.

    Each thread launches through its own cl.Kernel: setting arguments on a shared kernel
    object from two threads would race.
    """

    def __init__(self, queue: Any, program: Any, name: str) -> None:
        self.queue, self.program, self.name = queue, program, name
        self._local = threading.local()

    def _kernel(self) -> Any:
        kernel = getattr(self._local, "kernel", None)
        if kernel is None:
            kernel = self._local.kernel = cl.Kernel(self.program, self.name)
        return kernel

    def launch(self, args: tuple, size: backend.LaunchSize) -> float | None:
        kernel = self._kernel()
        kernel.set_args(*args)
        event = cl.enqueue_nd_range_kernel(self.queue, kernel, size.global_size, size.local_size)
        if not size.wait:
            return None
        event.wait()
        return (event.profile.end - event.profile.start) * 1e-9


# --------------------------------------------------------------------------
# Device
# --------------------------------------------------------------------------


def _fingerprint(device: Any) -> str:
    """Everything that changes the binary a source compiles to."""
    platform = device.platform
    return " | ".join(
        (
            f"{platform.name} {platform.version}",
            device.name,
            f"driver {device.driver_version}",
            device.version,
        )
    )


def _properties(index: int, device: Any) -> backend.DeviceProperties:
    extensions = device.extensions.split()
    fp64 = "cl_khr_fp64" in extensions or bool(getattr(device, "double_fp_config", 0))
    fp16 = "cl_khr_fp16" in extensions
    kind = "accelerator"
    if device.type & cl.device_type.GPU:
        kind = "gpu"
    elif device.type & cl.device_type.CPU:
        kind = "cpu"
    features = (kind, *(name for name, present in (("fp64", fp64), ("fp16", fp16)) if present))
    return backend.DeviceProperties(
        kind=NAME,
        index=index,
        model=device.name.strip(),
        vendor=device.vendor.strip(),
        driver_version=device.driver_version,
        compute_units=int(device.max_compute_units),
        max_work_group_size=int(device.max_work_group_size),
        memory_total_bytes=int(device.global_mem_size),
        supports_fp64=fp64,
        supports_fp16=fp16,
        threads=int(device.max_compute_units),
        features=features,
        fingerprint=_fingerprint(device),
    )


def _supported(fp64: bool) -> dict[str, frozenset[str]]:
    if fp64:
        return dict(backend.CATALOG_DTYPES)
    # float64 needs cl_khr_fp64, and so do integer means (a float64 output)
    supported = dict(backend.without_float64(backend.CATALOG_DTYPES))
    supported["mean"] -= _INTEGERS
    return supported


@dataclass(eq=False)
class OpenCLDevice(backend.Device):
    """One OpenCL device: a context, an in-order queue, and its loaded programs."""

    context: Any = None
    queue: Any = None
    cl_device: Any = None

    kernels: ClassVar[Mapping[str, backend.KernelFile]] = KERNELS

    @classmethod
    def open(cls, index: int, device: Any) -> OpenCLDevice:
        properties = _properties(index, device)
        context = cl.Context([device])
        queue = cl.CommandQueue(
            context, device, properties=cl.command_queue_properties.PROFILING_ENABLE
        )
        return cls(
            properties=properties,
            supported=_supported(properties.supports_fp64),
            context=context,
            queue=queue,
            cl_device=device,
        )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.allocator = OpenCLAllocator(self.context, self.queue, self.cl_device)
        self.compiler = OpenCLCompiler(self.context, self.cl_device)

    # -- the Device interface ---------------------------------------------------

    def refusal(
        self, op: str, shapes: Sequence[tuple[int, ...]], params: Mapping[str, Any]
    ) -> str | None:
        if op == "fft" and shapes and shapes[0]:
            n = shapes[0][-1]
            if n > 0 and n & (n - 1):
                return f"fft on {self.name} needs a power-of-two length, got {n}"
        return None

    @contextmanager
    def running(self, call: OpCall) -> Iterator[None]:
        try:
            yield
        except cl.Error as exc:
            raise backend.LaunchError(f"{call.op} on {self.name} failed: {exc}") from exc

    def memory_available_bytes(self) -> int:
        """Total global memory minus what this backend holds, pooled buffers included
        (OpenCL has no portable free-memory query, so other users are not counted)."""
        return max(0, self.properties.memory_total_bytes - self.allocator.held)

    def close(self) -> None:
        self.forget_programs()
        if self.queue is not None:
            self.queue.finish()
            self.allocator.release_pool()
        self.queue = self.context = None

    # -- programs -----------------------------------------------------------------

    def builds(self, kernel_file: backend.KernelFile, variant: str) -> bool:
        return variant != "float64" or self.properties.supports_fp64

    def options(self, kernel_file: backend.KernelFile, variant: str) -> tuple[str, ...]:
        """The table's options, plus what this device adds for builds of one dtype."""
        options = kernel_file.variants[variant]
        if variant not in _CL_TYPES:
            return options
        fp64 = self.properties.supports_fp64
        options = (*options, f"-DWIDE={'double' if fp64 else 'float'}")
        if fp64:
            options += ("-DHAVE_FP64",)
        # OpenCL lets float32 division be off by 2.5 ulp; NumPy's is correctly rounded
        options += ("-cl-fp32-correctly-rounded-divide-sqrt",)
        if kernel_file.file == "opencl_reduce.cl":
            options += self._reduce_options(variant)
        return options

    @property
    def reduce_local(self) -> int:
        return _REDUCE_LOCAL_CPU if "cpu" in self.properties.features else _REDUCE_LOCAL_GPU

    def _reduce_options(self, dtype: str) -> tuple[str, ...]:
        fp64 = self.properties.supports_fp64
        if dtype in _INTEGERS:
            acc, sum_out, mean_out = "long", "long", "double" if fp64 else "float"
        else:
            acc = "double" if fp64 else "float"
            sum_out = mean_out = _CL_TYPES[dtype]
        return (
            f"-DSUM_ACC={acc}",
            f"-DSUM_OUT={sum_out}",
            f"-DMEAN_OUT={mean_out}",
            f"-DLOCAL={self.reduce_local}",
        )

    def load(self, binary: bytes, options: Sequence[str]) -> Any:
        try:
            return cl.Program(self.context, [self.cl_device], [binary]).build(list(options))
        except cl.Error as exc:
            raise backend.CompileError("a cached OpenCL binary", str(exc)) from exc

    def program_of(self, loaded: Any, name: str) -> OpenCLProgram:
        return OpenCLProgram(self.queue, loaded, name)


# --------------------------------------------------------------------------
# One call's buffers and launches
# --------------------------------------------------------------------------


def _groups(n: int, local: int) -> int:
    """n rounded up to whole work-groups of `local` (kernels skip the extra items)."""
    return max(local, -(-n // local) * local)


# --------------------------------------------------------------------------
# Ops: each takes one `OpCall` and returns a fresh array
# --------------------------------------------------------------------------


def _launch_1d(program: backend.Program, n: int, *args: Any) -> None:
    program(*args, global_size=(_groups(n, _ELEMENTWISE_LOCAL),), local_size=(_ELEMENTWISE_LOCAL,))


def _binary(name: str) -> OpFn:
    def op(call: OpCall) -> np.ndarray:
        a, b = call.inputs
        if a.shape == b.shape and a.size != 1:
            variant = "tt"
        elif b.size == 1:  # b is a scalar operand (also when both are)
            variant = "ts"
        else:
            variant = "st"
        n = call.out.size
        kernel = call.kernel("opencl_elementwise.cl", a.dtype.name, f"{name}_{variant}")
        dout = call.alloc_out()
        _launch_1d(kernel, n, *call.upload_all(), dout, np.uint64(n))
        return call.result(dout)

    return op


def _unary(name: str) -> OpFn:
    def op(call: OpCall) -> np.ndarray:
        x, n = call.x, call.out.size
        # "exp_": OpenCL C has its own exp
        kernel = call.kernel(
            "opencl_elementwise.cl", x.dtype.name, "exp_" if name == "exp" else name
        )
        # the factor in x's dtype, as NumPy's x * factor computes it for a Python float
        factor = (x.dtype.type(call.params["factor"]),) if name == "scale" else ()
        dx, dout = call.upload(x), call.alloc_out()
        _launch_1d(kernel, n, dx, *factor, dout, np.uint64(n))
        return call.result(dout)

    return op


def _reduce(op: str) -> OpFn:
    def run(call: OpCall) -> np.ndarray:
        x, device = call.x, call.device
        plan = backend.reduction_plan(x, call.params, op)
        rows, cols, outputs = plan.n, plan.cols, plan.outputs
        variant = x.dtype.name
        # enough work-groups to fill every compute unit a few times over, each piece of a
        # row still long enough to repay its work-group
        target = 8 * device.properties.compute_units
        local = device.reduce_local
        chunks = max(1, min(-(-target // outputs), -(-rows // (16 * local)), 1024))
        chunk = -(-rows // chunks)
        chunks = -(-rows // chunk)
        acc_bytes = plan.accumulator(device.properties.supports_fp64).itemsize
        dx = call.upload(x)
        partial = call.alloc(outputs * chunks * acc_bytes)
        dout = call.alloc_out()
        kind = "max" if op == "max" else "sum"
        sizes = (rows, cols, chunk, chunks)
        call.kernel("opencl_reduce.cl", variant, f"partial_{kind}")(
            dx,
            partial,
            *(np.uint32(v) for v in sizes),
            global_size=(outputs * chunks * local,),
            local_size=(local,),
        )
        finish = call.kernel("opencl_reduce.cl", variant, f"finish_{op}")
        extra = (np.uint32(rows),) if op == "mean" else ()
        _launch_1d(finish, outputs, partial, dout, np.uint32(chunks), np.uint32(outputs), *extra)
        return call.result(dout)

    return run


def _op_softmax(call: OpCall) -> np.ndarray:
    n = call.x.shape[-1]
    local = call.device.reduce_local
    kernel = call.kernel("opencl_reduce.cl", call.x.dtype.name, "softmax")
    dx, dout = call.upload(call.x), call.alloc_out()
    kernel(dx, dout, np.uint32(n), global_size=(call.x.size // n * local,), local_size=(local,))
    return call.result(dout)


_MATMUL_TILE = 64  # rows and columns of C per work-group (TM, TN in opencl_matmul.cl)
_MATMUL_ITEMS = 8  # work-items per side of a work-group (WX, WY)


@dataclass(frozen=True)
class _Operand:
    """A matrix in a device buffer: offset, leading dimension and batch stride, in
    elements."""

    buffer: Any
    offset: int
    ld: int
    batch: int

    def args(self) -> tuple[Any, ...]:
        return self.buffer, np.uint64(self.offset), np.uint32(self.ld), np.uint64(self.batch)


def _matmul(
    call: OpCall, a: _Operand, b: _Operand, c: _Operand, m: int, n: int, k: int, batches: int
) -> None:
    kernel = call.kernel("opencl_matmul.cl", call.out.dtype.name, "matmul")
    groups_x, groups_y = -(-n // _MATMUL_TILE), -(-m // _MATMUL_TILE)
    kernel(
        *a.args(),
        *b.args(),
        *c.args(),
        *(np.uint32(v) for v in (m, n, k)),
        global_size=(groups_x * _MATMUL_ITEMS, groups_y * _MATMUL_ITEMS, batches),
        local_size=(_MATMUL_ITEMS, _MATMUL_ITEMS, 1),
    )


def _op_matmul(call: OpCall) -> np.ndarray:
    a, b = call.inputs
    batches = a.shape[0] if a.ndim == 3 else 1
    (m, k), n = a.shape[-2:], b.shape[-1]
    (da, db), dc = call.upload_all(), call.alloc_out()
    a_, b_, c_ = _Operand(da, 0, k, m * k), _Operand(db, 0, n, k * n), _Operand(dc, 0, n, m * n)
    _matmul(call, a_, b_, c_, m, n, k, batches)
    return call.result(dc)


_TRANSPOSE_TILE = 16


def _op_transpose(call: OpCall) -> np.ndarray:
    rows, cols = call.x.shape
    tile = _TRANSPOSE_TILE
    kernel = call.kernel("opencl_transpose.cl", str(call.x.itemsize), "transpose")
    dx, dout = call.upload(call.x), call.alloc_out()
    grid = (_groups(cols, tile), _groups(rows, tile))
    kernel(dx, dout, np.uint32(rows), np.uint32(cols), global_size=grid, local_size=(tile, tile))
    return call.result(dout)


def _op_conv2d(call: OpCall) -> np.ndarray:
    g = call.conv2d()
    n, o, oh, ow, window = g.n, g.o, g.oh, g.ow, g.window
    (dx, dw), dout = call.upload_all(), call.alloc_out()
    im2col = call.kernel("opencl_conv2d.cl", call.x.dtype.name, "im2col")
    weights = _Operand(dw, 0, window, 0)  # batch stride 0: every image shares them
    # Tiles of whole images while their columns fit the budget, else bands of output
    # rows of one image; each tile is one im2col and one (batched) matmul.
    per_image = window * oh * ow
    if per_image <= _IM2COL_BUDGET:
        images, band = min(n, max(1, _IM2COL_BUDGET // max(per_image, 1))), oh
    else:
        images, band = 1, max(1, _IM2COL_BUDGET // (window * ow))
    cols = call.alloc(images * window * band * ow * call.x.itemsize)
    shape = (g.c, g.h, g.w, g.kh, g.kw, g.sh, g.sw, g.ph, g.pw, ow)
    for n0 in range(0, n, images):
        tile = min(images, n - n0)
        for y0 in range(0, oh, band):
            rows = min(band, oh - y0)
            pixels = rows * ow
            args = (np.uint32(v) for v in (tile, n0, y0, rows, *shape))
            _launch_1d(im2col, tile * window * pixels, dx, cols, *args)
            staged = _Operand(cols, 0, pixels, window * pixels)
            # out[n0 + b, :, y0:y0 + rows, :] is a (o, rows * ow) matrix with rows
            # oh * ow apart
            into = _Operand(dout, (n0 * o * oh + y0) * ow, oh * ow, o * oh * ow)
            _matmul(call, weights, staged, into, o, pixels, window, tile)
    return call.result(dout)


def _op_fft(call: OpCall) -> np.ndarray:
    x = call.x
    n, total = x.shape[-1], x.size
    nbytes = total * 8
    if x.dtype == np.complex64:
        src = call.upload(x)
    else:
        real = call.upload(x)
        src = call.alloc(nbytes)
        to_complex = call.kernel("opencl_fft.cl", "complex64", "real_to_complex")
        _launch_1d(to_complex, total, real, src, np.uint64(total))
    dst = call.alloc(nbytes)
    radix2 = call.kernel("opencl_fft.cl", "complex64", "radix2")
    inverse = bool(call.params.get("inverse", False))
    sign = np.float32(1.0 if inverse else -1.0)
    items = total // 2
    ns = 1
    while ns < n:
        last = 2 * ns == n
        scale = np.float32(1.0 / n if inverse and last else 1.0)
        _launch_1d(
            radix2, items, src, dst, np.uint32(n), np.uint32(ns), sign, scale, np.uint64(items)
        )
        src, dst = dst, src
        ns *= 2
    # a length-1 transform is the identity (and its inverse divides by 1)
    return call.result(src)


OpenCLDevice.ops = backend.op_table(globals(), _binary, _unary, _reduce)
