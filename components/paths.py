"""Where ralflow reads and writes: local paths, and URIs pyarrow understands (``s3://``,
``gs://``, ``file://``). Training and prediction read a prepared dataset and write Ray Train
storage at any of them; what writes files atomically or reads CSV files and images (synth,
prepare, a submission) needs a local or mounted path.
"""

from __future__ import annotations

from pathlib import Path

from .errors import UserError


def filesystem_for(path: str):
    """(pyarrow filesystem, path inside it) for a local path or any URI pyarrow understands."""
    import pyarrow.fs

    return pyarrow.fs.FileSystem.from_uri(path) if "://" in path else (pyarrow.fs.LocalFileSystem(), path)


def local_path(path: str | Path, field: str, hint: str = "") -> Path:
    """``path`` as a local path: a ``file://`` URI becomes its path; another URI (``s3://``, ...)
    is refused naming ``field``: what reads CSV files and images, or writes files atomically,
    needs a local or mounted folder (training and prediction read ``--data`` from any URI)."""
    text = str(path)
    if text.startswith("file://"):
        import pyarrow.fs

        return Path(pyarrow.fs.FileSystem.from_uri(text)[1])
    if "://" in text:
        raise UserError(f"{field} {text}: must be a local or mounted path, not a URI{hint}", field=field)
    return Path(text).expanduser()


def local_folder(path: str | Path, field: str, hint: str = "") -> Path:
    """``local_path`` for a folder to write into: an existing file there is refused, naming ``field``."""
    folder = local_path(path, field, hint)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{field} {path} is a file, not a folder", field=field)
    return folder


def canonical(path: str) -> str:
    """One spelling per place (a run's identity holds it): a ``file://`` URI or a relative path
    becomes an absolute local path; other URIs stay as they are."""
    if "://" in path and not path.startswith("file://"):
        return path.rstrip("/")  # s3://b/data/ is s3://b/data
    return str(local_path(path, "path").resolve())
