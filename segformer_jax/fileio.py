"""Writes that are all or nothing: a reader never sees a half-written model, image or file.

May import: the standard library only (every floor uses it).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import BinaryIO


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it; set straight back
    os.umask(mask)
    return mask


def _ordinary_permissions(path: str, *, directory: bool) -> None:
    """mkstemp / mkdtemp create 0600 / 0700 whatever the umask; give the result the permissions an
    ordinary open() / mkdir() would (a serving process or a colleague can read a shared model)."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Yield a binary file that replaces `path` only when the block completes (a reader sees the
    old file or the whole new one, never half of it); on failure nothing is left behind."""
    path = os.path.abspath(os.fspath(path))
    directory, name = os.path.split(path)
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
        _ordinary_permissions(tmp, directory=False)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_bytes(data: bytes, path: str | os.PathLike) -> None:
    with atomic_file(path) as f:
        f.write(data)


@contextlib.contextmanager
def atomic_directory(out_dir: str | os.PathLike, *, overwrite: bool = False):
    """Yield a staging directory that becomes `out_dir` only when the block completes: a failure
    leaves nothing behind, and an existing non-empty `out_dir` is replaced only with overwrite=True."""
    out_dir = os.path.abspath(os.fspath(out_dir))
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)) and not overwrite:
        raise FileExistsError(f"{out_dir} already exists and is not empty; pass overwrite=True to replace it")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    try:
        yield staging
        # Some writers create their files 0600 whatever the umask (safetensors' save_file does): give
        # everything in the folder the permissions of an ordinary write.
        for parent, dirs, files in os.walk(staging):
            for name in dirs:
                _ordinary_permissions(os.path.join(parent, name), directory=True)
            for name in files:
                _ordinary_permissions(os.path.join(parent, name), directory=False)
        _ordinary_permissions(staging, directory=True)
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir) if os.path.isdir(out_dir) else os.remove(out_dir)
        os.rename(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
