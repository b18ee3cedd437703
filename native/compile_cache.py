"""The on-disk cache of compiled kernels, shared by every backend.

Compiling is bytes in, bytes out, so one cache serves OpenCL, CUDA and Metal. An entry
is keyed by the backend, the device fingerprint (model + driver version, or the CUDA
arch + toolkit version: a driver upgrade must never load a stale binary), the source
and the build options. Entries are written atomically (temp file + rename), so
concurrent processes and a crash mid-write never leave a torn binary; an unreadable
entry is compiled again.

The directory is ``$KERNELMESH_CACHE_DIR``, else ``$XDG_CACHE_HOME/kernelmesh/kernels``,
else ``~/.cache/kernelmesh/kernels``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["CacheInfo", "CompileCache", "default_cache", "default_directory"]

# Bumped when the entry layout changes, so old entries are ignored, not misread.
_LAYOUT = "1"


def default_directory() -> Path:
    explicit = os.environ.get("KERNELMESH_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "kernelmesh" / "kernels"


@dataclass(frozen=True)
class BackendUsage:
    entries: int
    bytes: int


@dataclass(frozen=True)
class CacheInfo:
    directory: Path
    entries: int
    bytes: int
    backends: dict[str, BackendUsage] = field(default_factory=dict)


class CompileCache:
    """Compiled binaries on disk; `hits` and `misses` count this process's lookups."""

    def __init__(self, directory: Path | str | None = None) -> None:
        self.directory = Path(directory) if directory is not None else default_directory()
        self.hits = 0
        self.misses = 0
        self._lock = threading.Lock()

    @staticmethod
    def key(backend: str, fingerprint: str, source: str, options: Sequence[str] = ()) -> str:
        digest = hashlib.sha256()
        for part in (_LAYOUT, backend, fingerprint, source, "\0".join(options)):
            digest.update(part.encode())
            digest.update(b"\xff")  # separator no part can contain in UTF-8
        return digest.hexdigest()

    def get_or_compile(
        self,
        backend: str,
        fingerprint: str,
        source: str,
        options: Sequence[str],
        compile: Callable[[], bytes],
        *,
        name: str = "",
    ) -> bytes:
        """The cached binary for this source and target, compiling it on a miss. A
        compile error propagates and nothing is cached."""
        key = self.key(backend, fingerprint, source, options)
        path = self._path(backend, key)
        try:
            binary = path.read_bytes()
        except OSError:
            binary = b""
        if binary:
            with self._lock:
                self.hits += 1
            return binary
        binary = compile()
        with self._lock:
            self.misses += 1
        meta = {
            "name": name,
            "backend": backend,
            "fingerprint": fingerprint,
            "options": list(options),
            "created": time.time(),
            "bytes": len(binary),
        }
        # a read-only or full disk costs a recompile next time, nothing more
        with contextlib.suppress(OSError):
            self._write(path, binary, meta)
        return binary

    def info(self) -> CacheInfo:
        backends: dict[str, BackendUsage] = {}
        if self.directory.is_dir():
            for backend_dir in sorted(p for p in self.directory.iterdir() if p.is_dir()):
                sizes = [p.stat().st_size for p in backend_dir.glob("*/*.bin")]
                if sizes:
                    backends[backend_dir.name] = BackendUsage(len(sizes), sum(sizes))
        return CacheInfo(
            directory=self.directory,
            entries=sum(b.entries for b in backends.values()),
            bytes=sum(b.bytes for b in backends.values()),
            backends=backends,
        )

    def clear(self) -> int:
        """Removes every entry; returns how many binaries were removed."""
        removed = self.info().entries
        if self.directory.is_dir():
            for child in self.directory.iterdir():
                if child.is_dir():
                    shutil.rmtree(child, ignore_errors=True)
        return removed

    def _path(self, backend: str, key: str) -> Path:
        return self.directory / backend / key[:2] / f"{key}.bin"

    @staticmethod
    def _write(path: Path, binary: bytes, meta: dict) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        for target, data in (
            (path.with_suffix(".json"), json.dumps(meta, indent=1).encode()),
            (path, binary),  # last: the binary's presence marks a complete entry
        ):
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                os.replace(tmp, target)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise


_default: CompileCache | None = None
_default_lock = threading.Lock()


def default_cache() -> CompileCache:
    """The process's cache in `default_directory()`, created on first use."""
    global _default
    with _default_lock:
        if _default is None:
            _default = CompileCache()
        return _default
