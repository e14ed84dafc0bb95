"""Writing files so that nobody ever reads a half-written one.

Snakemake, a resumed run or a reader in another process may look at an output at any
moment; a job killed mid-write must leave either the old file or none. Every writer in
tga goes through :func:`atomic_write`: the content goes to a per-process temporary
sibling (same folder, so the rename stays on one file system), then ``os.replace``.
:func:`no_empty_folders_left` does the same for folders: a failed step removes the
empty ones it created.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Mapping

TMP_SUFFIX = ".tmp"


def temporary_sibling(path: Path) -> Path:
    """``.name.<pid>.tmp`` beside ``path``: hidden, unique per process, and globbable as
    ``.name.*.tmp`` so a later run can clear what a killed one left."""
    return path.with_name(f".{path.name}.{os.getpid()}{TMP_SUFFIX}")


def stale_temporaries(path: Path) -> list[Path]:
    """Temporary siblings of ``path`` left by killed writers."""
    return sorted(path.parent.glob(f".{path.name}.*{TMP_SUFFIX}"))


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], object], mode: int = 0o644) -> Path:
    """Call ``write(tmp)`` to fill a temporary sibling, then rename it onto ``path``.

    The file gets ``mode`` (ordinary readable outputs by default). On any error the
    temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    try:
        write(tmp)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_many(files: Mapping[Path, bytes]) -> None:
    """Several files that belong together (e.g. a token file and its sidecar): each is
    written to its temporary sibling first, and only when all are complete are they
    renamed, so a failure never leaves one without the other half-written."""
    staged: list[tuple[Path, Path]] = []
    try:
        for path, data in files.items():
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = temporary_sibling(path)
            staged.append((tmp, path))
            tmp.write_bytes(data)
            os.chmod(tmp, 0o644)
        for tmp, path in staged:
            os.replace(tmp, path)
    except BaseException:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        raise


@contextmanager
def no_empty_folders_left(folder: str | os.PathLike[str]) -> Iterator[Path]:
    """Around a step that writes into ``folder``: when it fails, the empty folders it
    created go again (``folder``, any missing parents, and empty folders made inside it,
    such as ``checkpoints/``); files, and folders that existed before, stay."""
    folder = Path(folder)
    created = [p for p in (folder, *folder.parents) if not p.exists()]
    try:
        yield folder
    except BaseException:
        inside = sorted((p for p in folder.rglob("*") if p.is_dir()), reverse=True) if created else []
        for path in [*inside, *created]:  # deepest first
            if path.is_dir() and not any(path.iterdir()):
                path.rmdir()
        raise
