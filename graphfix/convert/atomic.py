"""Write a folder or a file all-or-nothing: into a hidden temp beside it, renamed into place at the end.

A conversion interrupted half way (a corrupt source tensor, a full disk,
Ctrl-C) must not leave a destination that looks like a checkpoint but is not
one. Building the result in ``<parent>/.<name>.graphfix-tmp-*`` and renaming it
once complete makes the destination appear whole or not at all (a rename within
one folder is atomic), and the temp folder is deleted on any error.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from graphfix.errors import InputError

TMP_MARKER = ".graphfix-tmp-"


def check_destination(src: Path, dst: Path, *, overwrite: bool) -> None:
    """Refuse destinations that would clobber data: existing ones (unless ``overwrite``) or the source itself."""
    src_r, dst_r = src.resolve(), dst.resolve()
    if dst_r == src_r or src_r in dst_r.parents or dst_r in src_r.parents:
        raise InputError(f"{dst}: the destination overlaps the source {src}; choose a folder outside it")
    if not dst_r.parent.is_dir():
        raise InputError(f"{dst.parent}: the destination's parent folder does not exist; create it first")
    if dst.exists() or dst.is_symlink():
        if not overwrite:
            raise InputError(f"{dst} already exists; pass --overwrite to replace it or choose another destination")
        if not dst.is_dir():
            raise InputError(f"{dst} exists and is not a folder; remove it or choose another destination")


@contextmanager
def atomic_dir(dst: Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp folder next to ``dst``; on success it replaces ``dst``, on any error it is removed."""
    dst = Path(dst)
    parent = dst.resolve().parent
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}{TMP_MARKER}", dir=parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        if dst.exists():
            if not overwrite:  # appeared while we were writing
                raise InputError(f"{dst} appeared during the conversion; pass --overwrite to replace it")
            old = Path(tempfile.mkdtemp(prefix=f".{dst.name}{TMP_MARKER}old-", dir=parent))
            os.rmdir(old)
            os.rename(dst, old)
            os.rename(tmp, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write(path: str | os.PathLike, data: str | bytes) -> None:
    """Write ``data`` to ``path`` whole or not at all (a temp file beside it, renamed over it; removed on error).

    Readers (a second process loading a cache, CI reading a report) never see half a file.
    The parent folder must exist; the file gets the umask's permissions, not ``mkstemp``'s 0600.
    """
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}{TMP_MARKER}", dir=target.parent)
    try:
        with os.fdopen(fd, "wb" if isinstance(data, bytes) else "w") as fh:
            fh.write(data)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
