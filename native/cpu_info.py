"""What this node's CPU is: model, vendor, cores, SIMD features and memory,
read from /proc/cpuinfo on Linux, sysctl on macOS and the platform module
anywhere else; plus live memory and utilisation readings.

The lowest layer: imports nothing of kernelmesh.
"""

from __future__ import annotations

import functools
import os
import platform
import subprocess
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import psutil

__all__ = ["CpuInfo", "UtilisationSampler", "cpu_info", "memory_available_bytes"]


@dataclass(frozen=True)
class CpuInfo:
    model: str
    """Marketing name, e.g. "AMD EPYC 7B13"."""
    vendor: str
    """"GenuineIntel", "AuthenticAMD", "ARM", "Apple", ... or "unknown"."""
    cores: int
    """Physical cores (logical CPUs where the OS does not say)."""
    threads: int
    """Logical CPUs this process may run on (its affinity mask)."""
    features: tuple[str, ...]
    """SIMD-relevant flags only, sorted, in Linux /proc/cpuinfo spelling
    (sse4_1, avx2, avx512f, asimd, sve, ...) on every OS."""
    memory_total_bytes: int


# -- SIMD feature names --------------------------------------------------------

# Per instruction-set family, because flag names collide across them: on x86
# "sme" is AMD's Secure Memory Encryption and "smep" a protection bit, on Arm
# "sme" is the Scalable Matrix Extension.
_X86, _ARM, _OTHER = "x86", "arm", "other"
_SIMD_FEATURES = {
    _X86: frozenset(
        [
            "sse",
            "sse2",
            "sse3",
            "ssse3",
            "sse4_1",
            "sse4_2",
            "sse4a",
            "avx",
            "avx2",
            "fma",
            "fma4",
            "f16c",
            "xop",
            "avx_vnni",
            "avx_vnni_int8",
            "avx_vnni_int16",
            "avx_ne_convert",
            "avx_ifma",
        ]
    ),
    _ARM: frozenset(
        ["neon", "asimd", "asimdhp", "asimddp", "asimdfhm", "asimdrdm", "bf16", "i8mm"]
    ),
    # POWER (altivec, vsx) and s390x (vx, vxe, vxe2).
    _OTHER: frozenset(["altivec", "vsx", "vx", "vxe", "vxe2"]),
}
_SIMD_PREFIXES = {_X86: ("avx512", "avx10", "amx"), _ARM: ("sve", "sme"), _OTHER: ()}
# Linux names SSE3 after its Prescott codename.
_ALIASES = {"pni": "sse3"}


def _family(machine: str) -> str:
    machine = machine.lower()
    if machine in ("x86_64", "amd64", "i386", "i486", "i586", "i686", "x86"):
        return _X86
    if machine.startswith(("arm", "aarch64")):
        return _ARM
    return _OTHER


def _simd_features(flags: Iterable[str], family: str) -> tuple[str, ...]:
    """The SIMD-relevant subset of `flags` for an instruction-set `family`,
    normalised, unique and sorted."""
    exact, prefixes = _SIMD_FEATURES[family], _SIMD_PREFIXES[family]
    found = set()
    for flag in flags:
        name = _ALIASES.get(flag.lower(), flag.lower()) if family == _X86 else flag.lower()
        if name in exact or (prefixes and name.startswith(prefixes)):
            found.add(name)
    return tuple(sorted(found))


# -- Linux ---------------------------------------------------------------------

# /proc/cpuinfo "CPU implementer" of Arm cores.
_ARM_IMPLEMENTERS = {
    0x41: "ARM",
    0x42: "Broadcom",
    0x43: "Cavium",
    0x46: "Fujitsu",
    0x48: "HiSilicon",
    0x4E: "NVIDIA",
    0x50: "APM",
    0x51: "Qualcomm",
    0x61: "Apple",
    0x6D: "Microsoft",
    0xC0: "Ampere",
}
# "CPU part" of common Arm Ltd. cores, for kernels that print no model name.
_ARM_PARTS = {
    0xD03: "Cortex-A53",
    0xD05: "Cortex-A55",
    0xD07: "Cortex-A57",
    0xD08: "Cortex-A72",
    0xD0B: "Cortex-A76",
    0xD0C: "Neoverse-N1",
    0xD40: "Neoverse-V1",
    0xD41: "Cortex-A78",
    0xD49: "Neoverse-N2",
    0xD4F: "Neoverse-V2",
    0xD8E: "Neoverse-N3",
    0xD84: "Neoverse-V3",
}


def _first_block(text: str) -> dict[str, str]:
    """The key/value pairs of the first processor's block of /proc/cpuinfo,
    plus any keys that only appear outside it (Arm kernels print "Hardware"
    once, at the end)."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        fields.setdefault(key.strip().lower(), value.strip())
    return fields


def _int_or_none(value: str | None) -> int | None:
    try:
        return int(value, 0) if value else None
    except ValueError:
        return None


def parse_proc_cpuinfo(text: str, machine: str | None = None) -> tuple[str, str, tuple[str, ...]]:
    """(model, vendor, features) from the text of /proc/cpuinfo; empty
    strings for what it does not say. `machine` (default: this one's
    platform.machine()) only matters when the text does not show the family."""
    machine = platform.machine() if machine is None else machine
    fields = _first_block(text)
    vendor = fields.get("vendor_id", "")
    model = fields.get("model name", "")
    implementer = _int_or_none(fields.get("cpu implementer"))
    if implementer is not None:
        vendor = vendor or _ARM_IMPLEMENTERS.get(implementer, "ARM")
        part = _int_or_none(fields.get("cpu part"))
        if not model and implementer == 0x41 and part in _ARM_PARTS:
            model = f"ARM {_ARM_PARTS[part]}"
    # x86 says "flags", Arm and s390x "Features"; POWER "cpu : POWER9 (raw), altivec supported".
    if "flags" in fields:
        family, flags = _X86, fields["flags"].split()
    else:
        family = _ARM if implementer is not None else _family(machine)
        flags = fields.get("features", "").split()
    if not model and "cpu" in fields:
        model = fields["cpu"].split(",")[0].strip()
        if "altivec supported" in fields["cpu"]:
            flags.append("altivec")
    return model, vendor, _simd_features(flags, family)


def _linux() -> tuple[str, str, tuple[str, ...]]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            return parse_proc_cpuinfo(f.read())
    except OSError:
        return "", "", ()


# -- macOS ---------------------------------------------------------------------

# hw.optional keys of Apple silicon, as their Linux /proc/cpuinfo names.
_MACOS_ARM_FEATURES = {
    "hw.optional.neon": ("neon", "asimd"),
    "hw.optional.advsimd": ("neon", "asimd"),
    "hw.optional.neon_hpfp": ("asimdhp",),
    "hw.optional.neon_fp16": ("asimdhp",),
    "hw.optional.arm.feat_fp16": ("asimdhp",),
    "hw.optional.arm.feat_dotprod": ("asimddp",),
    "hw.optional.arm.feat_fhm": ("asimdfhm",),
    "hw.optional.arm.feat_rdm": ("asimdrdm",),
    "hw.optional.arm.feat_bf16": ("bf16",),
    "hw.optional.arm.feat_i8mm": ("i8mm",),
    "hw.optional.arm.feat_sme": ("sme",),
    "hw.optional.arm.feat_sme2": ("sme2",),
}


def _sysctl(*args: str) -> str:
    try:
        result = subprocess.run(
            ["sysctl", *args], capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return result.stdout.strip() if result.returncode == 0 else ""


def macos_features(x86_flags: str, hw_optional: Mapping[str, str]) -> tuple[str, ...]:
    """Features from `sysctl -n machdep.cpu.features machdep.cpu.leaf7_features`
    (Intel: "SSE4.1 AVX1.0 AVX2 ...") and `sysctl hw.optional` as a mapping
    (Apple silicon: "hw.optional.neon" -> "1")."""
    flags = [tok.replace(".", "_") for tok in x86_flags.lower().split()]
    x86 = _simd_features(["avx" if tok == "avx1_0" else tok for tok in flags], _X86)
    arm = []
    for key, value in hw_optional.items():
        if value.strip() == "1":
            arm.extend(_MACOS_ARM_FEATURES.get(key.lower(), ()))
    return tuple(sorted({*x86, *_simd_features(arm, _ARM)}))


def _macos() -> tuple[str, str, tuple[str, ...]]:
    model = _sysctl("-n", "machdep.cpu.brand_string")
    vendor = _sysctl("-n", "machdep.cpu.vendor")
    if not vendor and platform.machine() == "arm64":
        vendor = "Apple"
    hw_optional = {}
    for line in _sysctl("hw.optional").splitlines():
        key, sep, value = line.partition(":")
        if sep:
            hw_optional[key.strip()] = value.strip()
    x86_flags = " ".join(
        _sysctl("-n", key) for key in ("machdep.cpu.features", "machdep.cpu.leaf7_features")
    )
    return model, vendor, macos_features(x86_flags, hw_optional)


# -- assembly ------------------------------------------------------------------


def _usable_threads() -> int:
    if hasattr(os, "sched_getaffinity"):
        try:
            return len(os.sched_getaffinity(0)) or 1
        except OSError:
            pass
    count = getattr(os, "process_cpu_count", os.cpu_count)()
    return count or 1


def _fallback_vendor() -> str:
    machine = platform.machine().lower()
    if machine.startswith(("arm", "aarch64")):
        return "ARM"
    return "unknown"


@functools.cache
def cpu_info() -> CpuInfo:
    """This node's CPU; read once per process."""
    if sys.platform.startswith("linux"):
        model, vendor, features = _linux()
    elif sys.platform == "darwin":
        model, vendor, features = _macos()
    else:
        model, vendor, features = "", "", ()
    threads = _usable_threads()
    return CpuInfo(
        model=model or platform.processor() or platform.machine() or "unknown CPU",
        vendor=vendor or _fallback_vendor(),
        cores=psutil.cpu_count(logical=False) or psutil.cpu_count(logical=True) or threads,
        threads=threads,
        features=features,
        memory_total_bytes=psutil.virtual_memory().total,
    )


def memory_available_bytes() -> int:
    """Memory available to new allocations right now, without swapping."""
    return psutil.virtual_memory().available


def _busy_and_total(times: Any) -> tuple[float, float]:
    # As psutil.cpu_percent counts them: guest time is already inside user
    # and nice on Linux; idle and iowait are not busy.
    total = sum(times) - getattr(times, "guest", 0.0) - getattr(times, "guest_nice", 0.0)
    busy = total - times.idle - getattr(times, "iowait", 0.0)
    return busy, total


class UtilisationSampler:
    """System-wide CPU busy fraction between calls, non-blocking.

    The same figure as `psutil.cpu_percent(interval=None) / 100`, but each
    sampler keeps its own previous reading, so two samplers (or other code
    calling psutil.cpu_percent) do not reset each other's interval. The first
    `sample()` covers the time since the sampler was made.
    """

    def __init__(self) -> None:
        self._busy, self._total = _busy_and_total(psutil.cpu_times())
        self._last = 0.0

    def sample(self) -> float:
        busy, total = _busy_and_total(psutil.cpu_times())
        d_total = total - self._total
        if d_total <= 0:
            # Called again within the kernel's accounting tick: no new
            # information, so keep the interval open and repeat the last value.
            return self._last
        d_busy = busy - self._busy
        self._busy, self._total = busy, total
        self._last = min(1.0, max(0.0, d_busy / d_total))
        return self._last
