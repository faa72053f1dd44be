"""The audit log's HMAC key, kept outside the home, and the durable (fsynced, 0600) writes it and the head need."""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
from pathlib import Path

from loraforge.errors import AuditError

KEY_ENV = "LORAFORGE_AUDIT_KEY_FILE"
MIN_KEY_BYTES = 32


def default_key_file() -> Path:
    """``$LORAFORGE_AUDIT_KEY_FILE``, else ``$XDG_CONFIG_HOME/loraforge/audit.key`` (default ``~/.config``)."""
    env = os.environ.get(KEY_ENV)
    if env:
        return Path(env).expanduser()
    config = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config).expanduser() / "loraforge" / "audit.key"


def key_id(key: bytes) -> str:
    """A public fingerprint of a key (16 hex digits), stored in each record to name the key it needs."""
    return hashlib.sha256(b"loraforge-audit-key-id\0" + key).hexdigest()[:16]


def read_key(path: Path) -> bytes | None:
    """The key in ``path``, or None when the file does not exist.

    Raises:
        AuditError: the file is accessible to other users, or holds fewer than 32 bytes.
    """
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    if st.st_mode & 0o007:
        raise AuditError(
            f"audit key {path} is accessible to other users (mode {oct(st.st_mode & 0o777)}); run `chmod 600 {path}`"
        )
    key = path.read_bytes().strip()
    if len(key) < MIN_KEY_BYTES:
        raise AuditError(
            f"audit key {path} holds {len(key)} bytes, fewer than {MIN_KEY_BYTES}; "
            f"remove it to have a new one made, or write one with `openssl rand -hex 32 > {path}`"
        )
    return key


def make_private_dirs(path: Path) -> None:
    """Create ``path`` and its missing parents with mode 0700 (existing directories are left as they are)."""
    missing = []
    while not path.exists():
        missing.append(path)
        path = path.parent
    for d in reversed(missing):
        with contextlib.suppress(FileExistsError):
            os.mkdir(d, 0o700)


def fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_new_file(path: Path, data: bytes) -> None:
    """Create ``path`` (mode 0600 from the start) holding ``data``; FileExistsError if it exists."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_file_durably(path: Path, data: bytes) -> None:
    """Replace ``path`` atomically with ``data`` (a 0600 temporary file beside it, then a rename)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        write_new_file(tmp, data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def load_or_create_key(path: Path) -> bytes:
    """The key in ``path``, made (32 random bytes as hex, mode 0600, directories 0700) if absent.

    Two processes creating it at once agree: the file appears complete or not at all (a hard link of
    a finished temporary file), and the loser reads the winner's key.
    """
    key = read_key(path)
    if key is not None:
        return key
    try:
        make_private_dirs(path.parent)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        write_new_file(tmp, secrets.token_hex(32).encode() + b"\n")
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
        fsync_directory(path.parent)
    except OSError as e:
        raise AuditError(
            f"cannot create the audit key {path}: {e}; set {KEY_ENV} to a file (mode 600) this user can write"
        ) from e
    key = read_key(path)
    assert key is not None
    return key
