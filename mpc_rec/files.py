"""Whole-file-or-nothing writes, used for every file mpc-rec produces."""

import contextlib
import os
import tempfile

from mpc_rec.errors import InputError


def write_text_atomic(path, text: str) -> None:
    """Replace ``path`` with ``text`` so readers see the old file or the new, never a part."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_bytes_atomic(path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so readers see the old file or the new, never a part."""
    target = os.path.abspath(os.fspath(path))
    directory = os.path.dirname(target)
    try:
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".part", dir=directory)
    except OSError as exc:
        raise InputError(f"{os.fspath(path)}: cannot write ({exc.strerror or exc})") from None
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        # mkstemp creates 0600; keep an existing file's mode, else use ordinary 0644.
        mode = os.stat(target).st_mode & 0o777 if os.path.exists(target) else 0o644
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):  # e.g. disk full, or path is a directory
            raise InputError(f"{os.fspath(path)}: cannot write ({exc.strerror or exc})") from None
        raise
    with contextlib.suppress(OSError):  # make the rename durable where directories fsync
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
