"""Atomic writes: a file or folder is written under a temporary name beside its target, flushed to disk, then
renamed into place, so a reader (or a rerun after a kill) sees the old version or the new one, never half of one.
The one place logart writes files that must survive an interruption.

    write_file(path, lambda tmp: torch.save(value, tmp))
    write_folder(directory, lambda tmp: model.save_pretrained(tmp), overwrite=False)
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from logart.errors import LogartError


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file(path, write) -> Path:
    """`write(tmp)` writes the content to the temporary path `tmp`; it is then synced and renamed to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        _fsync(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def refuse_to_overwrite(directory, overwrite: bool) -> None:
    """The one guard every folder writer calls (early, before slow work, and again at write time)."""
    directory = Path(directory)
    if directory.exists() and any(directory.iterdir()) and not overwrite:
        raise LogartError(f"{directory} already exists and is not empty; logart never overwrites a folder by accident.",
                          "choose another --output folder, or pass overwrite=True / --overwrite.")


def check_writable(directory, overwrite: bool = False) -> None:
    """Before any slow work: the folder must be creatable and writable where it will be written (its nearest
    existing parent), and not hold a user's files (unless `overwrite`)."""
    directory = Path(directory)
    refuse_to_overwrite(directory, overwrite)
    parent = next((p for p in (directory, *directory.parents) if p.exists()), Path("."))
    if not parent.is_dir():
        raise LogartError(f"cannot create {directory}: {parent} is a file, not a folder.",
                          "choose an --output path whose parents are folders.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise LogartError(f"cannot write {directory}: {parent} is not writable.",
                          "choose an --output folder you can write to.")


def write_folder(directory, write, overwrite: bool = False) -> Path:
    """`write(tmp)` fills a temporary folder beside `directory`; its files are synced and it is renamed into place
    (an existing folder is replaced only with `overwrite`)."""
    directory = Path(directory)
    refuse_to_overwrite(directory, overwrite)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        write(tmp)
        for f in tmp.rglob("*"):
            if f.is_file():
                _fsync(f)
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
            os.rename(directory, old)
            os.rename(tmp, directory)
            shutil.rmtree(old)
        else:
            os.rename(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory
