"""CPU discovery: real values on this machine, and the parsers on captured
/proc/cpuinfo and sysctl text from other machines."""

from __future__ import annotations

import dataclasses
import os
import platform
import threading
import time
from collections import namedtuple

import psutil
import pytest

from kernelmesh.native import cpu_info as ci
from kernelmesh.native.cpu_info import CpuInfo, UtilisationSampler, cpu_info

# -- this machine --------------------------------------------------------------


def test_model_and_vendor_are_named() -> None:
    info = cpu_info()
    assert info.model.strip()
    assert info.vendor.strip()


def test_cores_and_threads() -> None:
    info = cpu_info()
    assert info.cores >= 1
    assert info.threads >= 1
    assert info.threads <= (os.cpu_count() or info.threads)
    if hasattr(os, "sched_getaffinity"):
        assert info.threads == len(os.sched_getaffinity(0))


def test_memory_total_exceeds_available() -> None:
    info = cpu_info()
    available = ci.memory_available_bytes()
    assert info.memory_total_bytes > available > 0
    assert info.memory_total_bytes == psutil.virtual_memory().total


def test_features_are_sorted_unique_strings() -> None:
    features = cpu_info().features
    assert isinstance(features, tuple)
    assert all(isinstance(f, str) and f == f.lower() for f in features)
    assert list(features) == sorted(set(features))


@pytest.mark.skipif(
    platform.machine().lower() not in ("x86_64", "amd64"),
    reason="SSE2 is part of the x86-64 baseline; other architectures name other features",
)
def test_x86_64_has_sse2() -> None:
    assert "sse2" in cpu_info().features


@pytest.mark.skipif(
    platform.machine().lower() not in ("x86_64", "amd64"),
    reason="x86-only flag names",
)
def test_x86_features_are_only_simd() -> None:
    # /proc/cpuinfo lists ~100 flags on x86; none of the non-SIMD ones survive.
    for flag in ("fpu", "vme", "pae", "sme", "smep", "lm", "nx", "pni"):
        assert flag not in cpu_info().features


def test_cpu_info_is_cached_and_frozen() -> None:
    info = cpu_info()
    assert cpu_info() is info
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.cores = 99  # type: ignore[misc]


def test_memory_available_is_live() -> None:
    # Not cached: two reads agree with psutil to within what other processes
    # on the machine can allocate meanwhile (generous: 1 GiB).
    assert abs(ci.memory_available_bytes() - psutil.virtual_memory().available) < 2**30


def test_utilisation_is_a_fraction() -> None:
    sampler = UtilisationSampler()
    time.sleep(0.05)
    for _ in range(3):
        value = sampler.sample()
        assert isinstance(value, float)
        assert 0.0 <= value <= 1.0


def test_utilisation_rises_while_a_thread_spins() -> None:
    # One busy thread keeps one CPU of the machine busy, so the system-wide
    # fraction is at least about 1/ncpu whatever else the machine does. (The
    # spinning thread holds the GIL most of the time; psutil reads the OS
    # counters, so that does not matter.)
    ncpu = psutil.cpu_count() or 1
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            sum(range(1000))

    sampler = UtilisationSampler()
    thread = threading.Thread(target=spin, daemon=True)
    thread.start()
    try:
        time.sleep(0.6)
        busy = sampler.sample()
    finally:
        stop.set()
        thread.join()
    assert busy >= 0.7 / ncpu, f"busy fraction {busy:.3f} with one of {ncpu} CPUs spinning"


def test_samplers_do_not_reset_each_other() -> None:
    # Each sampler measures since its own previous call; psutil.cpu_percent's
    # shared state, or another sampler, must not shorten that interval.
    ncpu = psutil.cpu_count() or 1
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            sum(range(1000))

    slow = UtilisationSampler()
    thread = threading.Thread(target=spin, daemon=True)
    thread.start()
    try:
        time.sleep(0.5)
    finally:
        stop.set()
        thread.join()
    other = UtilisationSampler()
    psutil.cpu_percent(interval=None)
    time.sleep(0.3)
    other.sample()
    psutil.cpu_percent(interval=None)
    # `slow` still covers the spinning half-second.
    assert slow.sample() >= 0.7 * 0.5 / 0.8 / ncpu


def test_sampler_arithmetic(monkeypatch: pytest.MonkeyPatch) -> None:
    # Counted as psutil.cpu_percent counts: iowait is idle, guest time is
    # already inside user; a read with no new ticks repeats the last value.
    Times = namedtuple("Times", "user nice system idle iowait guest guest_nice")
    readings = iter(
        [
            Times(10, 0, 10, 100, 0, 0, 0),  # construction
            Times(40, 0, 20, 150, 10, 20, 0),  # +40 busy, +60 idle/iowait: 0.4
            Times(40, 0, 20, 150, 10, 20, 0),  # no tick since: still 0.4
            Times(140, 0, 20, 150, 10, 20, 0),  # +100 busy: 1.0
        ]
    )
    monkeypatch.setattr(ci.psutil, "cpu_times", lambda: next(readings))
    sampler = UtilisationSampler()
    assert sampler.sample() == pytest.approx(0.4)
    assert sampler.sample() == pytest.approx(0.4)
    assert sampler.sample() == pytest.approx(1.0)


# -- parsers -------------------------------------------------------------------

X86_CPUINFO = """\
processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 143
model name\t: Intel(R) Xeon(R) Platinum 8488C
flags\t\t: fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 \
clflush mmx fxsr sse sse2 ss ht syscall nx pdpe1gb rdtscp lm constant_tsc pni pclmulqdq \
ssse3 fma cx16 pcid sse4_1 sse4_2 x2apic movbe popcnt aes xsave avx f16c rdrand \
hypervisor lahf_lm abm 3dnowprefetch smep bmi1 avx2 bmi2 erms avx512f avx512dq rdseed \
adx smap avx512ifma clflushopt clwb avx512cd sha_ni avx512bw avx512vl xsaveopt \
avx_vnni avx512_bf16 wbnoinvd avx512vbmi umip avx512_vbmi2 gfni vaes vpclmulqdq \
avx512_vnni avx512_bitalg avx512_vpopcntdq amx_bf16 avx512_fp16 amx_tile amx_int8
bugs\t\t: spectre_v1 spectre_v2

processor\t: 1
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8488C
flags\t\t: fpu sse sse2
"""

AMD_CPUINFO = """\
processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B13
flags\t\t: fpu sse sse2 pni ssse3 fma sse4_1 sse4_2 avx f16c sse4a avx2 sme smep
"""

GRAVITON_CPUINFO = """\
processor\t: 0
BogoMIPS\t: 2100.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid \
asimdrdm jscvt fcma lrcpc dcpop sha3 sm3 sm4 asimddp sha512 sve asimdfhm dit uscat \
ilrcpc flagm ssbs paca pacg dcpodp svei8mm svebf16 i8mm bf16 dgh rng
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x1
CPU part\t: 0xd40
CPU revision\t: 1

processor\t: 1
Features\t: fp asimd
CPU implementer\t: 0x41
CPU part\t: 0xd40
"""

RPI_CPUINFO = """\
processor\t: 0
model name\t: ARMv7 Processor rev 4 (v7l)
BogoMIPS\t: 38.40
Features\t: half thumb fastmult vfp edsp neon vfpv3 tls vfpv4 idiva idivt vfpd32 lpae
CPU implementer\t: 0x41
CPU part\t: 0xd03

Hardware\t: BCM2835
"""

POWER_CPUINFO = """\
processor\t: 0
cpu\t\t: POWER9 (raw), altivec supported
clock\t\t: 2300.000000MHz
"""


def test_parse_intel() -> None:
    model, vendor, features = ci.parse_proc_cpuinfo(X86_CPUINFO, "x86_64")
    assert model == "Intel(R) Xeon(R) Platinum 8488C"
    assert vendor == "GenuineIntel"
    assert features == (
        "amx_bf16",
        "amx_int8",
        "amx_tile",
        "avx",
        "avx2",
        "avx512_bf16",
        "avx512_bitalg",
        "avx512_fp16",
        "avx512_vbmi2",
        "avx512_vnni",
        "avx512_vpopcntdq",
        "avx512bw",
        "avx512cd",
        "avx512dq",
        "avx512f",
        "avx512ifma",
        "avx512vbmi",
        "avx512vl",
        "avx_vnni",
        "f16c",
        "fma",
        "sse",
        "sse2",
        "sse3",
        "sse4_1",
        "sse4_2",
        "ssse3",
    )


def test_parse_amd_keeps_secure_memory_encryption_out() -> None:
    # On x86 "sme" is AMD Secure Memory Encryption, not Arm's matrix extension.
    model, vendor, features = ci.parse_proc_cpuinfo(AMD_CPUINFO, "x86_64")
    assert (model, vendor) == ("AMD EPYC 7B13", "AuthenticAMD")
    assert "sme" not in features
    assert "smep" not in features
    assert "sse3" in features  # from "pni"
    assert "sse4a" in features


def test_parse_graviton() -> None:
    model, vendor, features = ci.parse_proc_cpuinfo(GRAVITON_CPUINFO, "aarch64")
    assert model == "ARM Neoverse-V1"
    assert vendor == "ARM"
    assert features == (
        "asimd",
        "asimddp",
        "asimdfhm",
        "asimdhp",
        "asimdrdm",
        "bf16",
        "i8mm",
        "sve",
        "svebf16",
        "svei8mm",
    )


def test_parse_32_bit_arm() -> None:
    model, vendor, features = ci.parse_proc_cpuinfo(RPI_CPUINFO, "armv7l")
    assert model == "ARMv7 Processor rev 4 (v7l)"
    assert vendor == "ARM"
    assert features == ("neon",)


def test_parse_power() -> None:
    model, vendor, features = ci.parse_proc_cpuinfo(POWER_CPUINFO, "ppc64le")
    assert model == "POWER9 (raw)"
    assert vendor == ""  # cpu_info() falls back to "unknown"
    assert features == ("altivec",)


def test_parse_empty_text() -> None:
    assert ci.parse_proc_cpuinfo("", "x86_64") == ("", "", ())


def test_macos_intel_features() -> None:
    features = ci.macos_features(
        "FPU VME DE PSE SSE SSE2 SSE3 SSSE3 FMA SSE4.1 SSE4.2 AVX1.0 F16C RDRAND "
        "SMEP BMI1 AVX2 BMI2 AVX512F AVX512CD",
        {},
    )
    assert features == (
        "avx",
        "avx2",
        "avx512cd",
        "avx512f",
        "f16c",
        "fma",
        "sse",
        "sse2",
        "sse3",
        "sse4_1",
        "sse4_2",
        "ssse3",
    )


def test_macos_apple_silicon_features() -> None:
    hw_optional = {
        "hw.optional.neon": "1",
        "hw.optional.arm.FEAT_FP16": "1",
        "hw.optional.arm.FEAT_DotProd": "1",
        "hw.optional.arm.FEAT_BF16": "1",
        "hw.optional.arm.FEAT_I8MM": "1",
        "hw.optional.arm.FEAT_SME": "0",
        "hw.optional.floatingpoint": "1",
    }
    assert ci.macos_features("", hw_optional) == (
        "asimd",
        "asimddp",
        "asimdhp",
        "bf16",
        "i8mm",
        "neon",
    )


def test_cpu_info_fields() -> None:
    assert [f.name for f in dataclasses.fields(CpuInfo)] == [
        "model",
        "vendor",
        "cores",
        "threads",
        "features",
        "memory_total_bytes",
    ]
