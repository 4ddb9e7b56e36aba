"""Atomic writes: a file or directory appears under its final name complete, or not at all.

Everything is first written under a hidden temporary name next to the destination (same filesystem, so the final
rename is atomic); a failure or an interrupt removes the temporary and leaves any earlier version in place.
Temporaries are created with the process umask, like a plain `open(path, "w")` or `os.makedirs` (tempfile's
mkstemp/mkdtemp would make them, and so the result, owner-only).

This module imports nothing of the package, so any layer may use it.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
from collections.abc import Iterator
from typing import IO, Any


def _temporary_name(path: str, kind: str) -> str:
    """A hidden sibling of `path`, unique per process and call."""
    head, tail = os.path.split(os.path.abspath(path))
    return os.path.join(head, f".{tail}.{kind}-{os.getpid()}-{secrets.token_hex(4)}")


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", **open_kwargs) -> Iterator[IO]:
    """`with atomic_write(path) as f: ...` writes `f` under a temporary name and renames it to `path` when the block
    succeeds. `mode` is "w" or "wb"; `open_kwargs` go to `open` (encoding, newline)."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write writes a whole file: mode must be 'w' or 'wb', got {mode!r}")
    path = os.fspath(path)
    tmp = _temporary_name(path, "tmp")
    # 0o666 & ~umask, as open() would; O_EXCL: the name is ours alone
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with open(fd, mode, **open_kwargs) as f:
            yield f
        os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.remove(tmp)


def write_text_atomic(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    with atomic_write(path, "w", encoding=encoding) as f:
        f.write(text)


def write_json_atomic(path: str | os.PathLike, obj: Any, indent: int | None = 2, **dump_kwargs) -> None:
    """JSON of `obj`; `dump_kwargs` go to json.dump (e.g. default=str for values JSON has no type for)."""
    with atomic_write(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=indent, **dump_kwargs)


def replace_directory(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Renames the complete directory `src` to `dst`. An existing `dst` is first renamed aside and deleted only
    after the new one is in place, so a failure never loses both."""
    src, dst = os.fspath(src), os.fspath(dst)
    old = None
    if os.path.lexists(dst):
        old = _temporary_name(dst, "old")
        os.replace(dst, old)
    try:
        os.replace(src, dst)
    except BaseException:
        if old is not None:
            os.replace(old, dst)
        raise
    if old is not None:
        _remove(old)


@contextlib.contextmanager
def atomic_directory(out_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[str]:
    """Yields a new empty directory next to `out_dir` that becomes `out_dir` only if the block succeeds. An existing
    `out_dir` is an error unless `overwrite`, in which case it is replaced (see replace_directory)."""
    out_dir = os.path.abspath(out_dir)
    if os.path.lexists(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir} already exists (pass overwrite=True / --overwrite to replace it)")
    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    tmp = _temporary_name(out_dir, "partial")
    os.mkdir(tmp)  # 0o777 & ~umask, as os.makedirs would
    try:
        yield tmp
        replace_directory(tmp, out_dir)
    finally:
        if os.path.lexists(tmp):
            _remove(tmp)
