"""Every file and folder dsv3lab writes goes through this module, so that a crash never leaves a half-written one
and nothing outside the target is ever written, read or deleted.

* :func:`atomic_path` — write to a hidden temporary name beside the target, flush it to disk, then ``os.replace``
  it over the target (a rename within one folder is atomic on POSIX and Windows). Readers see the old file or the
  new one, never a mixture. :func:`atomic_write_text` and :func:`atomic_write_json` are the common cases.
* :func:`atomic_folder` — the same for a folder (checkpoints): fill a hidden temporary folder, then publish it with
  :func:`publish`, which replaces an existing target only after the new folder is complete.
* :func:`member` — a file named inside a folder (a shard named by an index) must stay inside it: no absolute path,
  no ``..``, no symlink out.
* :func:`check_replaceable` — the one guard before a folder is replaced (``--overwrite``): only a folder that holds
  what the caller writes (a checkpoint, a run), never one that contains the source or the working directory.
* :class:`RunLock` — one process at a time per run folder (an OS lock, released on any exit, even ``kill -9``).

Temporary names start with ``.`` and contain ``.tmp-`` (files, folders being written) or ``.old-`` (a replaced
folder waiting to be deleted), followed by the writer's pid, so that no reader mistakes them for results; leftovers
of a crashed writer are removed by the next save of the same target.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import shutil
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

try:  # POSIX advisory locks (Linux, macOS)
    import fcntl
except ImportError:  # pragma: no cover - Windows: RunLock then only records the pid and cannot refuse a second run
    fcntl = None

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


def read_json(path: str | os.PathLike, what: str = "a JSON object") -> dict[str, Any]:
    """A JSON object from ``path``; a missing file, invalid JSON or another JSON type is one clear error naming the
    file (``FileNotFoundError`` / ``ValueError``), never a bare decoder traceback."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (expected {what})")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); expected {what}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a JSON {type(obj).__name__}, expected {what}")
    return obj


def is_empty_folder(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


@contextmanager
def atomic_folder(
    path: str | os.PathLike, overwrite: bool = False, replaceable: Callable[[Path], bool] | None = None, src=None
) -> Iterator[Path]:
    """Yield a temporary folder beside ``path`` to fill; on success it is published at ``path`` (:func:`publish`),
    on an exception it is deleted. An existing non-empty ``path`` is an error unless ``overwrite``, and then only when
    :func:`check_replaceable` allows it (``replaceable``: is it a folder of the kind being written; ``src``: a source
    the new folder is made from, which must not be inside ``path``)."""
    path = Path(path)
    if path.exists() and not is_empty_folder(path):
        if not overwrite:
            raise FileExistsError(f"{path} exists and is not empty; pass overwrite=True (--overwrite) to replace it")
        check_replaceable(path, replaceable, src)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        publish(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Delete ``.<name>.tmp-<pid>*`` / ``.<name>.old-<pid>*`` siblings of ``path`` left by writers that are no longer
    running (a crash mid-save); a live writer's are kept. Returns what was removed."""
    removed = []
    for mark in (TMP_MARK, OLD_MARK):
        for p in path.parent.glob(f".{path.name}{mark}*"):
            digits = "".join(c for c in p.name[len(f".{path.name}{mark}") :].split(".")[0] if c.isdigit())
            if digits and _pid_alive(int(digits)) and int(digits) != os.getpid():
                continue
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            removed.append(p)
    return removed


_RENAME_EXCHANGE = 2  # linux/fs.h


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False where it is not available."""
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return False
    libc = ctypes.CDLL(libc_name, use_errno=True)
    if not hasattr(libc, "renameat2"):
        return False
    at_fdcwd = -100
    rc = libc.renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE)
    if rc != 0:
        errno = ctypes.get_errno()
        if errno in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: the file system cannot exchange
            return False
        raise OSError(errno, os.strerror(errno), str(b))
    return True


def publish(tmp: Path, path: Path) -> None:
    """Move the finished folder ``tmp`` to ``path``. An existing target is swapped out in one atomic step where the
    OS can (Linux), so a crash at any moment leaves either the old or the new folder at ``path``; elsewhere it is
    moved aside first and :func:`recover` puts it back if a crash struck between the two renames."""
    if path.exists() and not is_empty_folder(path):
        old = path.with_name(f".{path.name}{OLD_MARK}{os.getpid()}")
        if old.exists():  # this process's own leftover from an earlier failed publish
            shutil.rmtree(old)
        if _exchange(tmp, path):  # path now holds the new folder, tmp the old one
            os.replace(tmp, old)
        else:
            os.replace(path, old)
            os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        if path.exists():
            path.rmdir()
        os.replace(tmp, path)


def recover(path: str | os.PathLike) -> bool:
    """If ``path`` is missing but a crashed :func:`publish` left the old folder beside it, put it back."""
    path = Path(path)
    if path.exists():
        return False
    olds = sorted(path.parent.glob(f".{path.name}{OLD_MARK}*"), key=lambda p: p.stat().st_mtime)
    if not olds:
        return False
    os.replace(olds[-1], path)
    return True


# ---------------------------------------------------------------------- reading inside a folder
def member(folder: str | os.PathLike, name: str, what: str = "file") -> Path:
    """``folder / name`` for a file that a folder's own index names, refused when it would leave the folder: an
    absolute path, a ``..`` component, or a symlink whose target lies outside."""
    folder = Path(folder)
    parts = Path(name).parts
    if not name or Path(name).is_absolute() or ".." in parts or "\\" in name:
        raise CheckpointError(f"{folder}: the {what} {name!r} is not a plain name inside the folder; refused")
    path = folder / name
    root = folder.resolve()
    if path.is_symlink() or path.exists():
        target = path.resolve()
        if root not in target.parents and target != root:
            raise CheckpointError(f"{folder}: the {what} {name!r} points outside the folder (to {target}); refused")
    return path


# ---------------------------------------------------------------------- replacing a folder
def check_replaceable(dst: Path, replaceable: Callable[[Path], bool] | None = None, src=None) -> None:
    """The one guard before ``dst`` is deleted or replaced (``--overwrite``): ``dst`` must be a folder of the kind
    being written (``replaceable(dst)``; a plain file or any other folder is refused), and it must not contain the
    source it is made from nor the current working directory."""
    dst = Path(dst)
    real = dst.resolve()
    if not dst.is_dir():
        raise FileExistsError(f"{dst} exists and is not a folder; refusing to replace it")
    cwd = Path.cwd().resolve()
    if real == cwd or real in cwd.parents:
        raise FileExistsError(f"refusing to replace {dst}: it contains the current working directory")
    if src is not None:
        s = Path(src).resolve()
        if s == real or real in s.parents:
            raise FileExistsError(f"refusing to replace {dst}: it contains the source {src}")
    if replaceable is not None and not replaceable(dst):
        raise FileExistsError(
            f"refusing to replace {dst}: it is not a folder written by dsv3lab of the kind being written "
            "(choose an empty or new folder, or delete it yourself)"
        )


# ---------------------------------------------------------------------- one writer per run folder
class RunLock:
    """Hold ``folder/.lock`` for the lifetime of a run: a second process on the same folder is refused, naming the
    pid that holds it. The lock is the OS's (``fcntl.flock``), so it is released on any exit — an exception, Ctrl-C or
    ``kill -9`` — and a lock file left behind by a dead process is never mistaken for a live one. Re-entrant within a
    process (nested ``with`` blocks on the same folder share the lock)."""

    _held: dict[str, tuple[int, int]] = {}  # folder -> (fd, depth): this process's own locks

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.key = str(self.folder.resolve())

    def __enter__(self) -> RunLock:
        if self.key in RunLock._held:
            fd, depth = RunLock._held[self.key]
            RunLock._held[self.key] = (fd, depth + 1)
            return self
        self.created = not self.folder.exists()  # a run refused before writing anything leaves no folder behind
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / ".lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
                os.close(fd)
                raise FileExistsError(
                    f"{self.folder} is in use by {holder}: one dsv3lab run at a time per folder "
                    "(wait for it to finish, or choose another --out)"
                ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
        RunLock._held[self.key] = (fd, 1)
        return self

    def __exit__(self, *exc) -> None:
        fd, depth = RunLock._held[self.key]
        if depth > 1:
            RunLock._held[self.key] = (fd, depth - 1)
            return
        del RunLock._held[self.key]
        if getattr(self, "created", False) and os.listdir(self.folder) == [".lock"]:
            os.unlink(self.folder / ".lock")  # nothing but the lock: the folder this lock made goes too
            self.folder.rmdir()
        os.close(fd)  # closing the descriptor releases the flock


class CheckpointError(ValueError):
    """A checkpoint that does not match the model it describes (missing/unexpected tensors, shapes, scales, config)."""


def names_list(names: list[str], limit: int = 20) -> str:
    """``a, b, c … and N more``: a long list of names in an error message."""
    shown = ", ".join(names[:limit])
    return shown + (f" … and {len(names) - limit} more" if len(names) > limit else "")
