"""Every file and folder dsv3lab writes goes through this module, so that a crash never leaves a half-written one.

* :func:`atomic_path` — write to a hidden temporary name beside the target, flush it to disk, then ``os.replace``
  it over the target (a rename within one folder is atomic on POSIX and Windows). Readers see the old file or the
  new one, never a mixture. :func:`atomic_write_text` and :func:`atomic_write_json` are the common cases.
* :func:`atomic_folder` — the same for a folder (checkpoints): fill a hidden temporary folder, then publish it with
  :func:`publish`, which replaces an existing target only after the new folder is complete.

Temporary names start with ``.`` and contain ``.tmp-`` (files, folders being written) or ``.old-`` (a replaced
folder waiting to be deleted), so that no reader mistakes them for results.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

TMP_MARK = ".tmp-"
OLD_MARK = ".old-"


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path to write ``path``'s new content to; on success it replaces ``path`` atomically, on an
    exception it is deleted and ``path`` is untouched. ``suffix`` keeps an ending that a writer insists on (numpy's
    ``savez`` appends ``.npz`` to a name without it)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}{suffix}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:  # the bytes reach the disk before the rename makes them visible
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Pretty-printed, key-sorted JSON (``default=str`` for paths and dtypes), written atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def is_empty_folder(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


@contextmanager
def atomic_folder(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``path`` to fill; on success it is published at ``path`` (:func:`publish`),
    on an exception it is deleted. An existing non-empty ``path`` is an error unless ``overwrite``."""
    path = Path(path)
    if path.exists() and not is_empty_folder(path) and not overwrite:
        raise FileExistsError(f"{path} exists and is not empty; pass overwrite=True (--overwrite) to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}{TMP_MARK}", dir=path.parent))
    try:
        yield tmp
        publish(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def publish(tmp: Path, path: Path) -> None:
    """Move the finished folder ``tmp`` to ``path``; an existing target is moved aside first and deleted after."""
    if path.exists() and not is_empty_folder(path):
        old = Path(tempfile.mkdtemp(prefix=f".{path.name}{OLD_MARK}", dir=path.parent))
        os.replace(path, old / "x")
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        if path.exists():
            path.rmdir()
        os.replace(tmp, path)


class CheckpointError(ValueError):
    """A checkpoint that does not match the model it describes (missing/unexpected tensors, shapes, scales, config)."""


def names_list(names: list[str], limit: int = 20) -> str:
    """``a, b, c … and N more``: a long list of names in an error message."""
    shown = ", ".join(names[:limit])
    return shown + (f" … and {len(names) - limit} more" if len(names) > limit else "")
