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


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # another user's process: alive
        return True
    return True


def remove_stale(path) -> list[Path]:
    """Remove the temporaries a killed logart process left beside `path` (`.NAME.tmp-PID-*`, `.NAME.old-PID`).
    Only names of that pattern whose process is gone are touched: never a user's file, never a live writer's."""
    path = Path(path)
    removed = []
    if not path.parent.is_dir():
        return removed
    for leftover in path.parent.glob(f".{glob_escape(path.name)}.*"):
        parts = leftover.name[len(path.name) + 2:].split("-")
        if len(parts) < 2 or parts[0] not in ("tmp", "old") or not parts[1].isdigit() or _alive(int(parts[1])):
            continue
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)
        removed.append(leftover)
    return removed


def glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def write_file(path, write) -> Path:
    """`write(tmp)` writes the content to the temporary path `tmp`; it is then synced and renamed to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-{os.getpid()}-")
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
    remove_stale(directory)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-{os.getpid()}-", dir=directory.parent))
    try:
        write(tmp)
        for f in tmp.rglob("*"):
            if f.is_file():
                _fsync(f)
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old-{os.getpid()}-")
            os.rename(directory, old)
            os.rename(tmp, directory)
            shutil.rmtree(old)
        else:
            os.rename(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory
