"""The state dir and the files kernelmesh keeps in it are private to the server's
user: they hold every tenant's tasks, tensors and key digests.

A directory the server creates is 0700 and a file 0600 from the start. A state
dir that already exists was chosen by someone: the server does not change it,
but warns when group or others may enter it. Files and directories that only
kernelmesh makes inside it (the database, blobs/) are tightened if an earlier
version left them readable."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

log = logging.getLogger(__name__)

DIR_MODE = 0o700
FILE_MODE = 0o600


def state_dir(directory: Path) -> None:
    """Creates `directory` 0700 (missing parents as the umask makes them); an
    existing one is left as it is, with a warning if group or others may use it."""
    try:
        directory.mkdir(parents=True, mode=DIR_MODE)
    except FileExistsError:
        if not directory.is_dir():
            raise NotADirectoryError(f"{directory} exists and is not a directory") from None
        mode = stat.S_IMODE(directory.stat().st_mode)
        if mode & 0o077:
            log.warning(
                "the state dir %s is open to other users (mode %04o): it holds every "
                "tenant's tasks and tensors; consider `chmod 700 %s`",
                directory,
                mode,
                directory,
            )
        return
    os.chmod(directory, DIR_MODE)  # mkdir's mode passes through the umask


def own_dir(directory: Path) -> None:
    """A directory only kernelmesh writes (blobs/): created 0700, tightened to 0700."""
    directory.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
    tighten(directory, DIR_MODE)


def own_file(path: Path) -> None:
    """A file only kernelmesh writes: created empty and 0600 when missing (SQLite
    then gives its -wal and -shm files the same mode), tightened to 0600 if not."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE)
    os.close(fd)
    tighten(path, FILE_MODE)


def tighten(path: Path, mode: int = FILE_MODE) -> None:
    """Takes away any permission beyond `mode` from a path kernelmesh owns, if it
    exists."""
    try:
        found = stat.S_IMODE(os.stat(path, follow_symlinks=False).st_mode)
    except FileNotFoundError:
        return
    if found & ~mode:
        os.chmod(path, mode, follow_symlinks=False)
        log.info("made %s private to this user (mode %04o, was %04o)", path, mode, found)


__all__ = ["DIR_MODE", "FILE_MODE", "own_dir", "own_file", "state_dir", "tighten"]
