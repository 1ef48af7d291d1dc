"""Atomic file writes: the one way luab_sk writes a file that another run may read.

A file is written to a temporary name in its folder, flushed to disk, given the permissions a plain
``open()`` would give (not ``mkstemp``'s private 0600), and renamed into place: a reader sees the old file
or the complete new one, never a half-written one, and a crash leaves at most a hidden ``.<name>.*.tmp``.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

__all__ = ["atomic_write", "write_json"]


def atomic_write(path, write: Callable[[BinaryIO], object]) -> None:
    """Write ``path`` through ``write(binary file object)``, atomically.

    Parameters
    ----------
    path : str or path-like
        The destination; its folder must exist.
    write : callable
        Called once with a binary file object open for writing.

    Examples
    --------
    >>> import tempfile
    >>> from pathlib import Path
    >>> target = Path(tempfile.mkdtemp()) / "hello.txt"
    >>> atomic_write(target, lambda fh: fh.write(b"hello"))
    >>> target.read_bytes()
    b'hello'
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path, obj) -> None:
    """Write ``obj`` as canonical JSON (sorted keys), atomically.

    Examples
    --------
    >>> import tempfile
    >>> from pathlib import Path
    >>> target = Path(tempfile.mkdtemp()) / "a.json"
    >>> write_json(target, {"b": 1, "a": [2]})
    >>> json.loads(target.read_text())
    {'a': [2], 'b': 1}
    """
    atomic_write(path, lambda fh: fh.write(json.dumps(obj, indent=1, sort_keys=True).encode()))
