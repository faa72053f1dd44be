"""Write files and directories so that nothing half-written is ever visible, and nobody else reads them.

Everything loraforge writes is private to the user who runs it: files are created 0600 and
directories 0700, with that mode from the start (a temporary file has its mode before the
rename makes it visible). Training data, adapters, keys' hashes, usage and audit records are
company data; a file another local user should read is shared on purpose, with ``chmod``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

FILE_MODE = 0o600
DIRECTORY_MODE = 0o700


def private_directory(path: str | Path) -> Path:
    """Create ``path`` and its missing parents with mode 0700.

    An existing directory that others can read is made private too when it is ours (a home
    made by an older version); one owned by another user is left as it is.
    """
    path = Path(path)
    missing = []
    for parent in [path, *path.parents]:
        if parent.is_dir():
            break
        missing.append(parent)
    for directory in reversed(missing):
        with contextlib.suppress(FileExistsError):
            os.mkdir(directory, DIRECTORY_MODE)
        os.chmod(directory, DIRECTORY_MODE)  # mkdir's mode is reduced by the umask
    if not missing:
        with contextlib.suppress(OSError):
            info = path.stat()
            if info.st_uid == os.getuid() and info.st_mode & 0o077:
                os.chmod(path, DIRECTORY_MODE)
    return path


def open_private(path: str | Path, flags: int, *, text: bool = False) -> IO[Any]:
    """Open ``path`` (created 0600 if missing; an existing file of ours is made 0600) for ``flags``."""
    fd = os.open(path, flags | os.O_CLOEXEC, FILE_MODE)
    try:
        info = os.fstat(fd)
        if info.st_uid == os.getuid() and info.st_mode & 0o077:
            os.fchmod(fd, FILE_MODE)
        access = flags & (os.O_RDONLY | os.O_WRONLY | os.O_RDWR)
        mode = {os.O_RDONLY: "r", os.O_WRONLY: "w", os.O_RDWR: "r+"}[access]
        if flags & os.O_APPEND:
            mode = "a" if access == os.O_WRONLY else "a+"
        if text:
            return open(fd, mode, encoding="utf-8")
        return open(fd, mode + "b")
    except BaseException:
        os.close(fd)
        raise


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same directory and a rename."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory and a rename."""
    path = Path(path)
    private_directory(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)  # 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_directory(final: str | Path, *, replace: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside ``final``; rename it to ``final`` when the block succeeds.

    Readers only ever see ``final`` complete or absent. Temporary directories start with ``.tmp-``
    so that a crash leaves something no reader picks up (see :func:`remove_stale_temporaries`).

    Args:
        final: the directory to create.
        replace: replace an existing ``final`` (the old one is removed after the new one is in place).

    Raises:
        FileExistsError: ``final`` exists and ``replace`` is false.
    """
    final = Path(final)
    private_directory(final.parent)
    if final.exists() and not replace:
        raise FileExistsError(f"{final} already exists")
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}.", dir=final.parent))  # 0700
    try:
        yield tmp
        # Whatever wrote into it (a library's save, a copy keeping its source's mode) is made
        # private before the rename shows it.
        for root, dirs, files in os.walk(tmp):
            for name in dirs:
                os.chmod(os.path.join(root, name), DIRECTORY_MODE)
            for name in files:
                with open(os.path.join(root, name), "rb") as f:
                    os.fchmod(f.fileno(), FILE_MODE)
                    os.fsync(f.fileno())
        if final.exists():
            old = final.parent / f".tmp-old-{final.name}.{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_stale_temporaries(directory: str | Path, name: str = "") -> None:
    """Delete ``.tmp-NAME*`` leftovers of writes that were killed part-way (all of them by default)."""
    directory = Path(directory)
    if directory.is_dir():
        for child in directory.glob(f".tmp-{name}*"):
            shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink(missing_ok=True)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """The hex SHA-256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()
