"""Output folders that covspec may replace, and how it replaces them without a gap.

    >>> write_folder("checkpoints/toy-drafter", lambda tmp: model.save_pretrained(tmp),
    ...              kind="drafter")          # refuses a non-empty folder covspec did not make
    >>> write_folder(out, writer, overwrite=True)   # the user said so (`--overwrite`)

Every folder covspec writes carries a marker file (`.covspec-output`). An existing folder is
replaced only when it has that marker, when `legacy(folder)` recognises an output of an older
covspec (made before markers existed), or with `overwrite`; anything else is refused before a
byte is written, naming the folder. The new folder is written beside the old one and swapped in
with one atomic exchange (Linux `renameat2(RENAME_EXCHANGE)`), its files synced to disk first;
where the file system cannot exchange, two renames are used and a folder left at the `.old` name
by a crash between them is put back by the next write. Writers into one parent folder take turns
(an advisory lock on that folder), so one never removes another's half-written temporary folder.
No Lightning, no torch: every layer may use it.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import uuid
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

MARKER = ".covspec-output"


class OutputFolderError(ValueError):
    """An output path covspec must not replace (a file, or a foreign non-empty folder)."""


def is_ours(folder: Path, legacy: Callable[[Path], bool] | None = None) -> bool:
    """Whether `folder` was written by covspec: it has the marker, or `legacy` recognises it."""
    return (folder / MARKER).is_file() or (legacy is not None and legacy(folder))


def check_replaceable(
    out: str | Path, overwrite: bool = False, legacy: Callable[[Path], bool] | None = None
) -> None:
    """Refuse `out` when it is a file, or a non-empty folder covspec did not make (unless
    `overwrite`). Call it before any expensive work, so a refusal costs nothing."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputFolderError(f"output path {out} exists and is not a folder")
    if overwrite or not out.is_dir() or not any(out.iterdir()) or is_ours(out, legacy):
        return
    raise OutputFolderError(
        f"output folder {out} is not empty and was not written by covspec (no {MARKER} "
        "marker): choose another folder, or pass --overwrite (overwrite=True) to replace it"
    )


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_uint,
    ]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EPERM, errno.ENOTSUP):
        return False  # this file system cannot exchange: fall back to two renames
    raise OSError(err, os.strerror(err), str(b))


def recover(out: Path) -> None:
    """Put back a folder that a crash left at its `.old` name between two renames, and remove
    temporary siblings of earlier, interrupted writes (they are ours by name)."""
    if not out.exists():
        olds = sorted(out.parent.glob(f".{out.name}.old-*"), key=lambda p: p.stat().st_mtime)
        if olds:
            olds[-1].rename(out)
    for stale in out.parent.glob(f".{out.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)


def write_folder(
    out: str | Path,
    write: Callable[[Path], None],
    *,
    overwrite: bool = False,
    kind: str = "output",
    legacy: Callable[[Path], bool] | None = None,
    info: dict | None = None,
) -> Path:
    """Run `write(tmp)` into a fresh sibling of `out`, mark it, then swap it in: at every
    instant `out` is either the complete old folder or the complete new one. `info` (plain
    values) is recorded in the marker beside the kind (`marker_info` reads it back)."""
    out = Path(out)
    check_replaceable(out, overwrite, legacy)  # refused before anything is created
    out.parent.mkdir(parents=True, exist_ok=True)
    with _locked(out):  # one writer at a time: `recover` must not take another's tmp folder
        recover(out)
        check_replaceable(out, overwrite, legacy)
        return _swap_in(out, write, {"created_by": "covspec", "kind": kind, **(info or {})})


@contextmanager
def _locked(out: Path):
    """An exclusive advisory lock on the parent folder of `out` (POSIX flock on the folder
    itself, so no lock file is left behind; writers into one parent take turns)."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    fd = os.open(out.parent, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as e:  # NFS (EBADF on a directory), Lustre without flock (ENOSYS), ...
            warnings.warn(
                f"no lock on {out.parent} ({e.strerror}): writers of {out.name} must not overlap",
                stacklevel=3,
            )
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _sync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot sync a directory
        pass
    finally:
        os.close(fd)


def _sync(folder: Path) -> None:
    """fsync every file under `folder`, then its folders, deepest first."""
    for root, _dirs, files in os.walk(folder, topdown=False):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _sync_dir(Path(root))


def marker_info(folder: str | Path) -> dict:
    """What `write_folder` recorded in a folder's marker; {} without one."""
    try:
        return json.loads((Path(folder) / MARKER).read_text())
    except (OSError, ValueError):
        return {}


def _swap_in(out: Path, write: Callable[[Path], None], marker: dict) -> Path:
    tag = uuid.uuid4().hex[:8]
    tmp, old = out.parent / f".{out.name}.tmp-{tag}", out.parent / f".{out.name}.old-{tag}"
    tmp.mkdir()
    try:
        write(tmp)
        (tmp / MARKER).write_text(json.dumps(marker) + "\n")
        _sync(tmp)  # on disk before it takes the name: a power cut leaves no empty files in it
        if out.exists() and _exchange(tmp, out):
            _sync_dir(out.parent)
            shutil.rmtree(tmp)  # now holds the old folder
            return out
        if out.exists():
            out.rename(old)  # a crash here leaves `old`, which `recover` puts back
        tmp.rename(out)
        _sync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not out.exists():
            old.rename(out)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return out
