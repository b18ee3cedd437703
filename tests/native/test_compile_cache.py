"""The on-disk compile cache: keyed on everything that changes a binary, atomic,
inspectable and clearable."""

from __future__ import annotations

import subprocess
import sys

import pytest

from kernelmesh.native.backend import CompileError
from kernelmesh.native.compile_cache import CompileCache, default_directory


class _Counting:
    def __init__(self, output: bytes = b"binary") -> None:
        self.calls = 0
        self.output = output

    def __call__(self) -> bytes:
        self.calls += 1
        return self.output + str(self.calls).encode()


def test_a_second_lookup_hits_without_compiling(tmp_path):
    compile_ = _Counting()
    first = CompileCache(tmp_path).get_or_compile("opencl", "dev drv1", "src", ["-O3"], compile_)
    again = CompileCache(tmp_path)  # a new process sees the same files
    assert again.get_or_compile("opencl", "dev drv1", "src", ["-O3"], compile_) == first
    assert compile_.calls == 1
    assert (again.hits, again.misses) == (1, 0)


@pytest.mark.parametrize(
    "change",
    [
        {"backend": "cuda"},
        {"fingerprint": "dev drv2"},  # a driver upgrade never loads a stale binary
        {"source": "src2"},
        {"options": ["-O2"]},
    ],
)
def test_any_part_of_the_key_changing_compiles_again(tmp_path, change):
    base = {"backend": "opencl", "fingerprint": "dev drv1", "source": "src", "options": ["-O3"]}
    cache, compile_ = CompileCache(tmp_path), _Counting()
    cache.get_or_compile(**base, compile=compile_)
    cache.get_or_compile(**{**base, **change}, compile=compile_)
    assert compile_.calls == 2


def test_options_are_not_confused_by_joining(tmp_path):
    assert CompileCache.key("b", "f", "s", ["-DA", "B"]) != CompileCache.key(
        "b", "f", "s", ["-DAB"]
    )


def test_a_failed_compile_propagates_and_caches_nothing(tmp_path):
    cache = CompileCache(tmp_path)

    def broken() -> bytes:
        raise CompileError("opencl_bad.cl", "error: expected ';'")

    with pytest.raises(CompileError, match="expected ';'"):
        cache.get_or_compile("opencl", "f", "bad", [], broken)
    assert cache.info().entries == 0


def test_an_empty_or_torn_entry_is_compiled_again(tmp_path):
    cache, compile_ = CompileCache(tmp_path), _Counting()
    cache.get_or_compile("opencl", "f", "s", [], compile_)
    (entry,) = tmp_path.glob("opencl/*/*.bin")
    entry.write_bytes(b"")
    cache.get_or_compile("opencl", "f", "s", [], compile_)
    assert compile_.calls == 2 and entry.read_bytes() == b"binary2"


def test_info_counts_per_backend_and_clear_empties(tmp_path):
    cache = CompileCache(tmp_path)
    cache.get_or_compile("opencl", "f", "a", [], _Counting(b"x" * 10))
    cache.get_or_compile("opencl", "f", "b", [], _Counting(b"y" * 20))
    cache.get_or_compile("cuda", "sm_90", "c", [], _Counting(b"z" * 30))
    info = cache.info()
    assert info.entries == 3
    assert info.backends["opencl"].entries == 2 and info.backends["cuda"].bytes == 31
    assert cache.clear() == 3
    assert cache.info().entries == 0


def test_no_temp_files_are_left_behind(tmp_path):
    cache = CompileCache(tmp_path)
    for i in range(5):
        cache.get_or_compile("metal", "f", f"s{i}", [], _Counting())
    assert not list(tmp_path.rglob(".tmp-*"))


def test_the_directory_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("KERNELMESH_CACHE_DIR", str(tmp_path / "explicit"))
    assert default_directory() == tmp_path / "explicit"
    monkeypatch.delenv("KERNELMESH_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_directory() == tmp_path / "xdg" / "kernelmesh" / "kernels"


def test_the_cache_cli_reports_and_clears(tmp_path):
    env_cache = tmp_path / "cli"
    CompileCache(env_cache).get_or_compile("opencl", "f", "s", [], _Counting())
    run = [sys.executable, "-m", "kernelmesh.clients", "cache"]
    env = {"KERNELMESH_CACHE_DIR": str(env_cache), "PATH": "/usr/bin:/bin"}
    info = subprocess.run([*run, "info"], env=env, capture_output=True, text=True, timeout=60)
    assert info.returncode == 0, info.stderr
    assert str(env_cache) in info.stdout and "opencl" in info.stdout
    cleared = subprocess.run([*run, "clear"], env=env, capture_output=True, text=True, timeout=60)
    assert "removed 1 compiled kernels" in cleared.stdout
    assert CompileCache(env_cache).info().entries == 0
