"""Write a folder atomically: build it beside the target, then swap it into place in one step.

A run that fails or is interrupted leaves the old folder as it was and nothing half-made. Where the
OS offers it (Linux `renameat2`), the swap is one atomic exchange and a new folder never replaces one
that appeared meanwhile (`RENAME_NOREPLACE`); elsewhere the old folder is renamed aside for the
instant of the swap, and a later write to the same place restores or removes what a crash left.
Files in the old folder that the package did not write (a user's notes) are carried into the new one.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable

MANIFEST = "asg-files.json"  # the names this package wrote into a folder
_TMP, _OLD = "asg-tmp", "asg-old"
_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2
_AT_FDCWD = -100
_STALE_SECONDS = 3600  # a leftover of an older asg, which recorded no process id, counts as abandoned after this


def write_folder(path: str | os.PathLike, fill: Callable[[Path], None], *, overwrite: bool,
                 check_replaceable: Callable[[Path], None] | None = None, legacy_names: Iterable[str] = ()) -> Path:
    """Make the folder `path` hold what `fill(tmp)` writes into an empty folder, atomically.

    Without `overwrite`, an existing `path` is a ValueError (checked again at the swap, so two writers
    never silently replace each other). With it, `check_replaceable(path)` decides whether the existing
    folder may be replaced; its files that the package did not write (those not in its manifest, or not
    in `legacy_names` for a folder from before manifests) are kept in the new folder.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover(path)
    _check_target(path, overwrite, check_replaceable)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{_TMP}-{os.getpid()}-", dir=path.parent))
    try:
        fill(tmp)
        written = sorted(p.name for p in tmp.iterdir())
        (tmp / MANIFEST).write_text(json.dumps({"files": written + [MANIFEST]}, indent=2) + "\n")
        _usual_permissions(tmp)
        _swap_in(tmp, path, overwrite, check_replaceable, set(legacy_names))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def recover(path: Path) -> None:
    """Undo what an interrupted write to `path` left beside it: an old folder renamed aside comes back
    when `path` is missing (else it is removed), and temporary folders of dead processes are removed."""
    if not path.parent.is_dir():
        return
    for item in sorted(path.parent.iterdir()):
        kind = _leftover_kind(item.name, path.name)
        if kind is None or not item.is_dir() or item.is_symlink():
            continue
        if kind == _OLD and not path.exists() and _abandoned(item, legacy_counts=True):
            os.rename(item, path)  # the crash came between moving the old folder aside and the new one in
        elif _abandoned(item):
            shutil.rmtree(item, ignore_errors=True)


def files_written(folder: Path, legacy_names: set[str]) -> set[str]:
    """The names in `folder` that the package wrote: its manifest, else the names a package-written folder holds."""
    try:
        recorded = json.loads((folder / MANIFEST).read_text())["files"]
        if isinstance(recorded, list):
            return {name for name in recorded if isinstance(name, str)}
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return legacy_names | {MANIFEST}


def _check_target(path: Path, overwrite: bool, check_replaceable) -> None:
    if not path.exists() and not path.is_symlink():
        return
    if not overwrite:
        raise ValueError(f"{path} already exists; choose another folder or pass --overwrite")
    if not path.is_dir() or path.is_symlink():
        raise ValueError(f"{path} is not a folder; choose a folder path")
    if check_replaceable is not None:
        check_replaceable(path)


def _swap_in(tmp: Path, path: Path, overwrite: bool, check_replaceable, legacy_names: set[str]) -> None:
    if _rename(tmp, path, _RENAME_NOREPLACE):
        return
    # The target exists (perhaps written by another process since the check): replace only if allowed.
    _check_target(path, overwrite, check_replaceable)
    _carry_over(path, tmp, legacy_names)
    if _rename(tmp, path, _RENAME_EXCHANGE):
        shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old folder
        return
    backup = Path(tempfile.mkdtemp(prefix=f".{path.name}.{_OLD}-{os.getpid()}-", dir=path.parent))
    os.rmdir(backup)
    os.rename(path, backup)  # a crash from here to the next rename is repaired by recover()
    os.rename(tmp, path)
    shutil.rmtree(backup, ignore_errors=True)


def _carry_over(old: Path, new: Path, legacy_names: set[str]) -> None:
    """Copy into `new` what `old` holds that the package did not write and `new` does not have."""
    ours = files_written(old, legacy_names)
    for item in old.iterdir():
        if item.name in ours or (new / item.name).exists() or _leftover_kind(item.name, old.name):
            continue
        if item.is_dir() and not item.is_symlink():
            shutil.copytree(item, new / item.name, symlinks=True)
        else:
            shutil.copy2(item, new / item.name, follow_symlinks=False)


def _rename(source: Path, target: Path, flags: int) -> bool:
    """renameat2 with `flags`: True when done; False when the target exists (NOREPLACE) or for EXCHANGE when
    the OS lacks it. Without renameat2, NOREPLACE falls back to a check and a rename, which on POSIX still
    cannot replace a non-empty folder."""
    function = _renameat2()
    if function is not None:
        if function(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target), flags) == 0:
            return True
        error = ctypes.get_errno()
        if error == errno.EEXIST or (error == errno.ENOENT and flags == _RENAME_EXCHANGE):
            return False
        if error not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise OSError(error, os.strerror(error), str(target))
    if flags == _RENAME_EXCHANGE:
        return False
    if target.exists() or target.is_symlink():
        return False
    try:
        os.rename(source, target)
    except OSError as err:
        if err.errno in (errno.EEXIST, errno.ENOTEMPTY):
            return False
        raise
    return True


_LIBC: list = []


def _renameat2():
    if not _LIBC:
        function = None
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
            function = getattr(libc, "renameat2", None)
            if function is not None:
                function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
                function.restype = ctypes.c_int
        except OSError:
            function = None
        _LIBC.append(function)
    return _LIBC[0]


def _leftover_kind(name: str, target: str) -> str | None:
    """_TMP or _OLD for a folder that a write to `target` left beside it (also the names older asg used)."""
    prefix = f".{target}."
    if not name.startswith(prefix):
        return None
    rest = name[len(prefix):]
    if rest.startswith(_TMP + "-") or (rest.endswith(".tmp") and "-" not in rest[:-4]) or rest == "tmp":
        return _TMP
    if rest.startswith((_OLD + "-", "old-")):
        return _OLD
    return None


def _abandoned(item: Path, legacy_counts: bool = False) -> bool:
    """True when the process that made `item` has ended; for older asg's names, which hold no process id,
    when it is over an hour old (or at once with `legacy_counts`)."""
    parts = item.name.split("-")
    if len(parts) >= 4 and parts[-3] in ("tmp", "old") and parts[-2].isdigit():
        pid = int(parts[-2])
        if pid == os.getpid():
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False
    if legacy_counts:
        return True
    try:
        return time.time() - item.stat().st_mtime > _STALE_SECONDS
    except OSError:
        return False


def _usual_permissions(folder: Path) -> None:
    """The modes a plain mkdir and open would give (mkdtemp and safetensors make them private)."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for item in folder.rglob("*"):
        if not item.is_symlink():
            item.chmod((0o777 if item.is_dir() else 0o666) & ~umask)
