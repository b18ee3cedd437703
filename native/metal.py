"""Metal backend (macOS, through PyObjC): Apple GPUs and the AMD/Intel GPUs of older Macs.

The same four small pieces as every backend (see `backend.py`): an allocator of shared-
storage `MTLBuffer`s, a compiler from MSL source to a ``.metallib``, a program (one
compute pipeline) and a device that runs catalog ops. Kernel sources are
``kernels/metal_*.metal``.

What runs here, and what does not:

- Metal has no float64, so no op is offered for float64: the placement never sends
  float64 work here. Integer sums accumulate in 64-bit ``long``; an integer mean is that exact
  int64 sum divided on the host in float64, so it matches the CPU backend exactly.
- fft runs for power-of-two lengths only (radix-2 Stockham); `refusal` says so for others.
- Kernels are compiled with fast math off: nan and inf behave as in NumPy.

What is cached on disk, exactly: when Xcode's offline Metal toolchain runs here (``xcrun
metal`` and ``xcrun metallib``; recent Xcode versions ship it as a separate download), each
kernel file is compiled to a ``.metallib`` and its bytes go through the shared compile
cache, keyed by the source, the compile options and a fingerprint of the GPU's name, the
macOS version and the toolchain's version. A metallib holds AIR, Apple's intermediate
code: building a pipeline from it still compiles AIR to GPU code, a step macOS's own Metal
shader cache speeds up, not ours. Without the offline toolchain, sources are compiled in
process (``newLibraryWithSource:options:error:``) on every start and nothing is written to
our cache: Metal offers no documented way to serialise a library compiled that way.

Importing this module works anywhere; PyObjC's ``Metal`` is imported only on macOS, when
a device is first needed.
"""

from __future__ import annotations

import functools
import math
import platform
import shutil
import struct
import subprocess
import sys
import tempfile
import types
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kernelmesh.native.backend import (
    CATALOG_DTYPES,
    Allocator,
    CompileError,
    Compiler,
    Device,
    DeviceProperties,
    KernelFile,
    LaunchError,
    LaunchSize,
    OpCall,
    OpFn,
    OutOfDeviceMemory,
    Program,
    kernel_source,
    kernel_table,
    op_table,
    reduction_plan,
    without_float64,
)

__all__ = [
    "KERNELS",
    "NAME",
    "OP_KERNELS",
    "SUPPORTED_DTYPES",
    "MetalAllocator",
    "MetalCompiler",
    "MetalDevice",
    "MetalProgram",
    "available",
    "devices",
    "kernel_source",
    "offline_toolchain",
]

NAME = "metal"

# The catalog's ops and dtypes less float64, which Metal lacks.
SUPPORTED_DTYPES: Mapping[str, frozenset[str]] = without_float64(CATALOG_DTYPES)
_DTYPES = ("float32", "int32", "int64")  # of the elementwise kernels

# Xcode's offline compiler, with fast math off as for in-process compiles.
_OFFLINE_OPTIONS: tuple[str, ...] = ("-fno-fast-math",)
# Each file is one build ("msl") holding kernels for every dtype, named by it.
_MSL = "msl"


def _file(file: str, *kernels: str) -> KernelFile:
    return KernelFile(file, {_MSL: _OFFLINE_OPTIONS}, {_MSL: kernels})


# Every kernel (host name) of every file. tests/native/test_metal_sources.py parses the
# files and checks these names against them, so drift shows without a Mac.
KERNELS: Mapping[str, KernelFile] = kernel_table(
    _file(
        "metal_elementwise.metal",
        *(f"{op}_{dtype}" for op in ("add", "sub", "mul") for dtype in _DTYPES),
        "div_float32",
        *(f"relu_{dtype}" for dtype in _DTYPES),
        "exp_float32",
        "scale_float32",
        "gelu_float32",
    ),
    _file(
        "metal_reduce.metal",
        *(
            f"{op}_{dtype}_{shape}"
            for op, dtype in (
                ("sum", "float32"),
                ("mean", "float32"),
                ("sum", "int32"),
                ("sum", "int64"),
                ("max", "float32"),
                ("max", "int32"),
                ("max", "int64"),
            )
            for shape in ("group", "thread")
        ),
    ),
    _file("metal_softmax.metal", "softmax_float32"),
    _file("metal_matmul.metal", "matmul_float32"),
    _file("metal_transpose.metal", "transpose_b32", "transpose_b64"),
    _file("metal_conv2d.metal", "conv2d_float32"),
    _file("metal_fft.metal", "fft_stage"),
)
_FILE_OF: Mapping[str, str] = {
    name: k.file for k in KERNELS.values() for names in k.kernels.values() for name in names
}


def _op_kernels() -> dict[str, dict[str, tuple[str, ...]]]:
    table: dict[str, dict[str, tuple[str, ...]]] = {}
    for op, dtypes in SUPPORTED_DTYPES.items():
        table[op] = {}
        for dtype in sorted(dtypes):
            if op in ("sum", "max", "mean"):
                # an integer mean is the int64 sum, divided on the host in float64
                base = "sum" if op == "mean" and dtype != "float32" else op
                kernels = (f"{base}_{dtype}_group", f"{base}_{dtype}_thread")
            elif op == "transpose":
                bits = 64 if dtype in ("complex64", "int64") else 32
                kernels = (f"transpose_b{bits}",)
            elif op == "fft":
                kernels = ("fft_stage",)
            else:
                kernels = (f"{op}_{dtype}",)
            table[op][dtype] = kernels
    return table


# op -> dtype -> every kernel `run` may launch for it.
OP_KERNELS: Mapping[str, Mapping[str, tuple[str, ...]]] = types.MappingProxyType(_op_kernels())

_MAX_GROUP = 256  # threadgroup-memory size of the reduce and softmax kernels
_TILE = 16  # matmul and transpose tile side: TILE x TILE threads per group
# A reduction with at least this many outputs, or this short an extent, runs one thread
# per output: that already fills the GPU, where a threadgroup per output would sit idle.
_THREAD_PER_OUTPUT_FROM = 16384
_SHORT_EXTENT = 64

# MTLCommandBufferStatusError and MTLCommandBufferErrorOutOfMemory in MTLCommandBuffer.h;
# literals so that the error path can be exercised without importing Metal.
_STATUS_ERROR = 5
_ERROR_OUT_OF_MEMORY = 8


# --------------------------------------------------------------------------
# Availability and discovery
# --------------------------------------------------------------------------


@functools.cache
def _pyobjc() -> types.SimpleNamespace:
    """PyObjC's Metal, libdispatch and objc modules (macOS only; raises ImportError)."""
    import libdispatch
    import Metal
    import objc

    return types.SimpleNamespace(Metal=Metal, libdispatch=libdispatch, objc=objc)


def available() -> str | None:
    """None when Metal can run here, else why not."""
    if sys.platform != "darwin":
        return f"Metal runs only on macOS (this is {platform.system() or sys.platform})"
    try:
        objc = _pyobjc()
    except ImportError:
        return "PyObjC's Metal framework is not installed (pip install 'kernelmesh[metal]')"
    if not _system_devices(objc.Metal):
        return "no Metal device found (a virtual machine or a remote session may hide the GPU)"
    return None


def _system_devices(metal: Any) -> list[Any]:
    found = list(metal.MTLCopyAllDevices() or ())
    if not found:
        default = metal.MTLCreateSystemDefaultDevice()
        found = [default] if default is not None else []
    # registryID is stable for the life of the machine's GPU registration, so the index
    # of a device (metal:0, metal:1) does not depend on the order Metal lists them in.
    return sorted(found, key=lambda device: device.registryID())


def devices() -> list[MetalDevice]:
    """Every Metal device of this Mac, in a stable order; none elsewhere."""
    if available() is not None:
        return []
    return [MetalDevice(i, d) for i, d in enumerate(_system_devices(_pyobjc().Metal))]


@functools.cache
def offline_toolchain() -> str | None:
    """The offline Metal compiler's version line when ``xcrun metal`` and ``xcrun metallib``
    both run here, else None. `xcrun --find` is not enough: recent Xcode versions find the
    tools but cannot run them until the Metal toolchain component is downloaded."""
    if sys.platform != "darwin" or shutil.which("xcrun") is None:
        return None
    version = ""
    for tool in ("metal", "metallib"):
        try:
            probe = subprocess.run(
                ["xcrun", "-sdk", "macosx", tool, "--version"],
                capture_output=True,
                text=True,
                timeout=60,
                stdin=subprocess.DEVNULL,
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        if probe.returncode != 0:
            return None
        if tool == "metal":
            lines = probe.stdout.strip().splitlines()
            version = lines[0] if lines else "metal"
    return version


# --------------------------------------------------------------------------
# Allocator, compiler, program
# --------------------------------------------------------------------------


class MetalAllocator(Allocator):
    """Shared-storage buffers: on Apple silicon the CPU and GPU see the same memory, so a
    copy in or out is one memcpy through ``contents()``, with no staging buffer."""

    min_bytes = 16  # Metal returns nil for a zero-length buffer

    def __init__(self, mtl_device: Any) -> None:
        super().__init__()
        self._device = mtl_device
        self.device_name = str(mtl_device.name())
        self._shared = _pyobjc().Metal.MTLResourceStorageModeShared

    def _alloc(self, nbytes: int) -> Any:
        buffer = self._device.newBufferWithLength_options_(nbytes, self._shared)
        if buffer is None:
            raise OutOfDeviceMemory(
                f"{self._device.name()} could not allocate a buffer of {nbytes} bytes "
                f"(largest: {self._device.maxBufferLength()} bytes)"
            )
        return buffer

    def _free(self, buffer: Any) -> None:
        # PyObjC releases the buffer when the last Python reference goes; marking it empty
        # gives its memory back now, even while a reference lingers in a traceback.
        buffer.setPurgeableState_(_pyobjc().Metal.MTLPurgeableStateEmpty)

    def _copyin(self, buffer: Any, host: np.ndarray) -> None:
        _bytes_of(buffer, host.nbytes)[:] = host.reshape(-1).view(np.uint8)

    def _copyout(self, host: np.ndarray, buffer: Any) -> None:
        host.reshape(-1).view(np.uint8)[:] = _bytes_of(buffer, host.nbytes)


def _bytes_of(buffer: Any, nbytes: int) -> np.ndarray:
    return np.frombuffer(buffer.contents().as_buffer(nbytes), dtype=np.uint8)


class MetalCompiler(Compiler):
    """MSL source to ``.metallib`` bytes with Xcode's offline toolchain (``xcrun metal``,
    then ``xcrun metallib``). Pure, so the compile cache stores its output; usable only
    where `offline_toolchain()` finds the tools."""

    def compile(
        self, source: str, options: Sequence[str] = (), *, name: str = "Metal source"
    ) -> bytes:
        if offline_toolchain() is None:
            raise RuntimeError("the offline Metal toolchain (xcrun metal, metallib) is not here")
        with tempfile.TemporaryDirectory(prefix="kernelmesh-metal-") as tmp:
            # a file named as asked, so that the compiler's log points at it
            stem = Path(name).stem if name.endswith(".metal") else "source"
            source_path = Path(tmp) / f"{stem}.metal"
            source_path.write_text(source, encoding="utf-8")
            air, metallib = source_path.with_suffix(".air"), source_path.with_suffix(".metallib")
            sdk = ["xcrun", "-sdk", "macosx"]
            for step in (
                [*sdk, "metal", *options, "-c", str(source_path), "-o", str(air)],
                [*sdk, "metallib", str(air), "-o", str(metallib)],
            ):
                done = subprocess.run(
                    step, capture_output=True, text=True, stdin=subprocess.DEVNULL
                )
                if done.returncode != 0:
                    raise CompileError(
                        name, done.stderr or done.stdout or f"exit {done.returncode}"
                    )
            return metallib.read_bytes()


class MetalProgram(Program):
    """One kernel of a loaded library: its compute pipeline."""

    def __init__(self, mtl_device: Any, queue: Any, library: Any, name: str) -> None:
        function = library.newFunctionWithName_(name)
        if function is None:
            raise CompileError(name, f"the library defines no kernel named {name!r}")
        pipeline, error = mtl_device.newComputePipelineStateWithFunction_error_(function, None)
        if pipeline is None:
            raise CompileError(name, _describe(error))
        self.name = name
        self.pipeline = pipeline
        self.max_threads = int(pipeline.maxTotalThreadsPerThreadgroup())
        self._device_name = str(mtl_device.name())
        self._queue = queue

    def encode(
        self, encoder: Any, args: Sequence[Any], groups: Sequence[int], threads: Sequence[int]
    ) -> None:
        """Adds one dispatch to a compute encoder: buffers are bound as they are, bytes
        (packed structs) are copied into the command by ``setBytes``."""
        if math.prod(threads) > self.max_threads:
            raise LaunchError(
                f"{self.name} on {self._device_name}: {math.prod(threads)} threads per "
                f"threadgroup, over the pipeline's limit of {self.max_threads}"
            )
        encoder.setComputePipelineState_(self.pipeline)
        for index, arg in enumerate(args):
            if isinstance(arg, bytes):
                encoder.setBytes_length_atIndex_(arg, len(arg), index)
            else:
                encoder.setBuffer_offset_atIndex_(arg, 0, index)
        encoder.dispatchThreadgroups_threadsPerThreadgroup_(_size(groups), _size(threads))

    def launch(self, args: tuple, size: LaunchSize) -> float | None:
        """Launches on a command buffer of its own. `size.global_size` counts
        threadgroups (as in tinygrad's Metal and CUDA backends), `local_size` threads per
        group."""
        command_buffer = self._queue.commandBuffer()
        encoder = command_buffer.computeCommandEncoder()
        self.encode(encoder, args, size.global_size, size.local_size or (1,))
        encoder.endEncoding()
        command_buffer.commit()
        if not size.wait:
            return None
        _finish(command_buffer, self.name, self._device_name)
        return command_buffer.GPUEndTime() - command_buffer.GPUStartTime()


def _size(dims: Sequence[int]) -> Any:
    width, height, depth = (*(int(d) for d in dims), 1, 1, 1)[:3]
    return _pyobjc().Metal.MTLSize(width, height, depth)


def _describe(error: Any) -> str:
    if error is None:
        return "no error description from Metal"
    return str(error.localizedDescription())


def _finish(command_buffer: Any, what: str, device_name: str) -> None:
    """Waits for a committed command buffer; a failed one raises LaunchError. The queue
    and device stay usable: Metal fails the command buffer, not the device."""
    command_buffer.waitUntilCompleted()
    if command_buffer.status() == _STATUS_ERROR:
        error = command_buffer.error()
        message = f"{what} failed on {device_name}: {_describe(error)}"
        if error is not None and error.code() == _ERROR_OUT_OF_MEMORY:
            raise OutOfDeviceMemory(message)
        raise LaunchError(message)


@dataclass(frozen=True)
class _Dispatch:
    kernel: str
    args: tuple[Any, ...]
    groups: int  # threadgroups in a one-dimensional grid
    threads: tuple[int, ...]  # threads per threadgroup


# --------------------------------------------------------------------------
# The device
# --------------------------------------------------------------------------


class MetalDevice(Device):
    """One Metal GPU. `run` is safe to call from several threads at once: each call
    encodes its own command buffer on the device's queue (both thread-safe in Metal), and
    the libraries and pipelines, built once, are guarded by a lock."""

    kernels = KERNELS
    missing_dtypes = types.MappingProxyType({"float64": "Metal has no float64"})

    def __init__(self, index: int, mtl_device: Any) -> None:
        mac_version = platform.mac_ver()[0] or "unknown"
        name = str(mtl_device.name())
        features = ["unified-memory"] if mtl_device.hasUnifiedMemory() else []
        if mtl_device.isLowPower():
            features.append("low-power")
        properties = DeviceProperties(
            kind=NAME,
            index=index,
            model=name,
            # Metal names no vendor; the older Intel Macs' discrete GPUs say so in the name
            vendor=next((v for v in ("AMD", "Intel", "NVIDIA") if v in name), "Apple"),
            driver_version=f"macOS {mac_version}",
            compute_units=0,  # Metal publishes no core count
            max_work_group_size=int(mtl_device.maxThreadsPerThreadgroup().width),
            memory_total_bytes=int(mtl_device.recommendedMaxWorkingSetSize()),
            supports_fp64=False,
            supports_fp16=True,
            features=tuple(features),
            fingerprint=f"{name}; macOS {mac_version}; {offline_toolchain() or 'in-process'}",
        )
        super().__init__(properties=properties, supported=SUPPORTED_DTYPES)
        self._mtl = mtl_device
        self._queue = mtl_device.newCommandQueue()
        self.allocator = MetalAllocator(mtl_device)
        self.compiler = MetalCompiler()

    # --- compiling ------------------------------------------------------------

    def build(self, kernel_file: KernelFile, variant: str) -> Any:
        return self.build_source(kernel_source(kernel_file.file), kernel_file.file)

    def build_source(self, source: str, what: str = "Metal source") -> Any:
        """An MTLLibrary from MSL source, through the compile cache when the offline
        toolchain is here (see the module's docstring); CompileError carries the log."""
        if offline_toolchain() is not None:
            binary = self.compile_cached(source, _OFFLINE_OPTIONS, what)
            library = self._load_metallib(binary)
            if library is not None:
                return library
            # A metallib this macOS cannot load (e.g. built by a newer SDK than the OS):
            # compile in process instead.
        return self._compile_in_process(source, what)

    def _load_metallib(self, binary: bytes) -> Any | None:
        libdispatch = _pyobjc().libdispatch
        data = libdispatch.dispatch_data_create(binary, len(binary), None, None)
        library, _error = self._mtl.newLibraryWithData_error_(data, None)
        return library

    def _compile_in_process(self, source: str, what: str) -> Any:
        metal = _pyobjc().Metal
        options = metal.MTLCompileOptions.alloc().init()
        if options.respondsToSelector_(b"setMathMode:"):  # macOS 15: fastMathEnabled's heir
            options.setMathMode_(getattr(metal, "MTLMathModeSafe", 0))
            # the default for functions stays "fast" even in safe mode
            options.setMathFloatingPointFunctions_(
                getattr(metal, "MTLMathFloatingPointFunctionsPrecise", 1)
            )
        else:
            options.setFastMathEnabled_(False)
        # A library with a non-nil error compiled with warnings; only a nil library failed.
        library, error = self._mtl.newLibraryWithSource_options_error_(source, options, None)
        if library is None:
            raise CompileError(what, _describe(error))
        return library

    def program_of(self, loaded: Any, name: str) -> MetalProgram:
        """One kernel of a library built by `build_source`."""
        return MetalProgram(self._mtl, self._queue, loaded, name)

    def _kernel(self, name: str) -> MetalProgram:
        return self.program(_FILE_OF[name], _MSL, name)

    # --- running ----------------------------------------------------------------

    def refusal(
        self, op: str, shapes: Sequence[tuple[int, ...]], params: Mapping[str, Any]
    ) -> str | None:
        if op == "fft" and shapes and shapes[0]:
            n = shapes[0][-1]
            if n & (n - 1):
                return f"Metal's fft takes power-of-two lengths only; the last axis has {n}"
        largest = max((math.prod(shape) for shape in shapes), default=0)
        # kernels index with 32-bit uints; 8 bytes covers the widest element (complex64)
        if largest >= 1 << 32:
            return f"a tensor of {largest} elements is over Metal kernels' 2**32 index range"
        limit = int(self._mtl.maxBufferLength())
        if largest * 8 > limit:
            return f"a tensor of {largest} elements may exceed {self.name}'s largest buffer"
        return None

    def memory_available_bytes(self) -> int:
        total = int(self._mtl.recommendedMaxWorkingSetSize())
        return max(0, total - int(self._mtl.currentAllocatedSize()))

    def running(self, call: OpCall) -> AbstractContextManager[Any]:
        # Worker threads have no Cocoa autorelease pool of their own; without one the
        # command buffers and encoders Metal autoreleases would pile up.
        return _pyobjc().objc.autorelease_pool()

    def _submit(self, what: str, dispatches: Sequence[_Dispatch]) -> None:
        """Encodes the dispatches, in order, into one command buffer and waits for it. A
        compute encoder runs its dispatches one after another, each seeing the writes of
        those before it, so multi-pass ops (fft) need no extra synchronisation."""
        programs = [self._kernel(d.kernel) for d in dispatches]
        command_buffer = self._queue.commandBuffer()
        encoder = command_buffer.computeCommandEncoder()
        try:
            for program, dispatch in zip(programs, dispatches, strict=True):
                program.encode(encoder, dispatch.args, (dispatch.groups,), dispatch.threads)
        finally:
            encoder.endEncoding()
        command_buffer.commit()
        _finish(command_buffer, what, self.name)

    def _threads(self, kernel: str, wanted: int) -> int:
        """The largest power of two of threads per group <= wanted, the kernels' shared
        memory and the pipeline's limit (>= 1)."""
        limit = min(wanted, _MAX_GROUP, self._kernel(kernel).max_threads)
        return 1 << max(0, limit.bit_length() - 1)


def _launch(
    call: OpCall,
    kernel: str,
    args: bytes,
    groups: int,
    threads: tuple[int, ...],
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Uploads the inputs, runs one dispatch writing the output's buffer (or `out`'s, a
    host array of another shape), copies it back."""
    host = call.out.empty() if out is None else out
    device_out = call.alloc(host.nbytes)
    dispatch = _Dispatch(kernel, (*call.upload_all(), device_out, args), groups, threads)
    call.device._submit(call.op, [dispatch])
    call.allocator.copyout(host, device_out)
    return host


def _pack(*values: int) -> bytes:
    """Kernel arguments of uint fields, laid out as the MSL struct declares them."""
    return struct.pack(f"={len(values)}I", *values)


def _groups_of(count: int, threads: int) -> int:
    return -(-count // threads)


# --------------------------------------------------------------------------
# Ops: host side. Each takes validated inputs and normalised params, as cpu.run does.
# --------------------------------------------------------------------------


def _binary_op(op: str) -> OpFn:
    def run(call: OpCall) -> np.ndarray:
        (a, b), out = call.inputs, call.out
        kernel = f"{op}_{out.dtype}"
        threads = call.device._threads(kernel, _MAX_GROUP)
        # a step of 0 makes the one-element operand a scalar
        args = _pack(out.size, int(a.size == out.size), int(b.size == out.size))
        return _launch(call, kernel, args, _groups_of(out.size, threads), (threads,))

    return run


def _unary_op(op: str) -> OpFn:
    def run(call: OpCall) -> np.ndarray:
        out = call.out
        kernel = f"{op}_{out.dtype}"
        threads = call.device._threads(kernel, _MAX_GROUP)
        # the factor rounded to float32 as NumPy's float32(factor) does (inf past the
        # range, where struct.pack("f") would raise)
        factor = np.float32(call.params.get("factor", 1.0)) if op == "scale" else np.float32(0)
        args = _pack(out.size) + factor.tobytes()
        return _launch(call, kernel, args, _groups_of(out.size, threads), (threads,))

    return run


def _reduce(op: str) -> OpFn:
    def run(call: OpCall) -> np.ndarray:
        x, device = call.x, call.device
        plan = reduction_plan(x, call.params, op)
        planes, n, cols, outputs = plan.planes, plan.n, plan.cols, plan.outputs
        # an integer mean is the exact int64 sum, divided on the host
        integer_mean = op == "mean" and x.dtype.kind == "i"
        base = "sum" if integer_mean else op
        device_dtype = plan.accumulator(fp64=False)  # int64 for integer sums, else x's dtype
        per_thread = outputs >= _THREAD_PER_OUTPUT_FROM or n < _SHORT_EXTENT
        kernel = f"{base}_{x.dtype.name}_{'thread' if per_thread else 'group'}"
        if per_thread:
            threads = device._threads(kernel, _MAX_GROUP)
            groups = _groups_of(outputs, threads)
        else:
            threads = device._threads(kernel, 1 << (n - 1).bit_length())
            groups = outputs
        acc = np.empty(outputs, device_dtype)
        _launch(call, kernel, _pack(planes, n, cols), groups, (threads,), out=acc)
        if integer_mean:
            acc = acc / n  # the exact int64 sum over n, in float64 as the CPU backend does
        return acc.astype(call.out.dtype, copy=False).reshape(call.out.shape)

    return run


def _op_softmax(call: OpCall) -> np.ndarray:
    n = call.out.shape[-1]
    kernel = f"softmax_{call.out.dtype}"
    threads = call.device._threads(kernel, 1 << (n - 1).bit_length())
    return _launch(call, kernel, _pack(n), call.out.size // n, (threads,))


def _op_matmul(call: OpCall) -> np.ndarray:
    a, b = call.inputs
    batch = a.shape[0] if a.ndim == 3 else 1
    (m, k), n = a.shape[-2:], b.shape[-1]
    tiles_m, tiles_n = _groups_of(m, _TILE), _groups_of(n, _TILE)
    args = _pack(m, n, k, tiles_m, tiles_n)
    groups = batch * tiles_m * tiles_n
    return _launch(call, f"matmul_{call.out.dtype}", args, groups, (_TILE, _TILE))


def _op_transpose(call: OpCall) -> np.ndarray:
    rows, cols = call.x.shape
    kernel = f"transpose_b{call.out.dtype.itemsize * 8}"
    tiles_down, tiles_across = _groups_of(rows, _TILE), _groups_of(cols, _TILE)
    args = _pack(rows, cols, tiles_across)
    return _launch(call, kernel, args, tiles_down * tiles_across, (_TILE, _TILE))


def _op_conv2d(call: OpCall) -> np.ndarray:
    g = call.conv2d()
    kernel = f"conv2d_{call.out.dtype}"
    args = _pack(*g.astuple())
    threads = call.device._threads(kernel, _MAX_GROUP)
    return _launch(call, kernel, args, _groups_of(call.out.size, threads), (threads,))


def _op_fft(call: OpCall) -> np.ndarray:
    x, device = call.x, call.device
    inverse = bool(call.params.get("inverse", False))
    n = x.shape[-1]
    # float32 input is the real part of a complex64 signal, as the catalog defines it
    signal = np.ascontiguousarray(x, dtype=np.complex64)
    result = call.out.empty()
    if n == 1:
        # the DFT of one point is that point (and 1/n is 1): nothing to compute
        result[...] = signal
        return result
    butterflies = result.size // 2
    threads = device._threads("fft_stage", _MAX_GROUP)
    groups = _groups_of(butterflies, threads)
    ping = call.upload(signal)
    pong = call.alloc(signal.nbytes)
    passes, span = [], 1
    while span < n:
        last = span * 2 == n
        scale = 1.0 / n if inverse and last else 1.0
        args = _pack(n, span, butterflies) + struct.pack("=2f", 1.0 if inverse else -1.0, scale)
        passes.append(_Dispatch("fft_stage", (ping, pong, args), groups, (threads,)))
        ping, pong = pong, ping
        span *= 2
    device._submit("fft", passes)
    call.allocator.copyout(result, ping)  # the last pass wrote what is now `ping`
    return result


MetalDevice.ops = op_table(globals(), _binary_op, _unary_op, _reduce)
