"""Content fingerprints: files (memoised on path, size and mtime) and image items."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
from PIL import Image

_FILE_HASHES: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes, memoised on (resolved path, size, mtime).

    Examples
    --------
    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "f.bin"
    >>> _ = p.write_bytes(b"abc")
    >>> file_sha256(p)[:12]
    'ba7816bf8f01'
    """
    path = Path(path).resolve()
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _FILE_HASHES:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        _FILE_HASHES[key] = h.hexdigest()
    return _FILE_HASHES[key]


def image_id(item, mode: str = "content") -> str:
    """A 32-hex-digit identifier of an image item.

    Parameters
    ----------
    item : path, PIL.Image.Image, numpy.ndarray or torch.Tensor
        The image.
    mode : {"content", "path"}
        ``"content"``: a BLAKE2b digest of the file's bytes (paths) or of the pixels, mode/dtype and shape.
        ``"path"``: for paths, a digest of the absolute path, size and modification time (no file read);
        other items are identified by content.

    Raises
    ------
    OSError
        If a path cannot be read (the caller reports it by path).

    Examples
    --------
    >>> import numpy as np
    >>> a = np.zeros((2, 2, 3), np.uint8)
    >>> image_id(a) == image_id(a.copy()) != image_id(a + 1)
    True
    """
    h = hashlib.blake2b(digest_size=16)
    if isinstance(item, (str, os.PathLike)):
        path = Path(item)
        if mode == "path":
            st = path.stat()
            h.update(f"path|{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
        else:
            h.update(b"file|")
            with open(path, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
        return h.hexdigest()
    if isinstance(item, Image.Image):
        h.update(f"pil|{item.mode}|{item.size}|".encode())
        h.update(item.tobytes())
        return h.hexdigest()
    if hasattr(item, "detach"):  # torch.Tensor
        item = item.detach().cpu().numpy()
    arr = np.ascontiguousarray(item)
    h.update(f"array|{arr.dtype.str}|{arr.shape}|".encode())
    h.update(arr.view(np.uint8).reshape(-1).data if arr.size else b"")
    return h.hexdigest()
