"""Write a folder or a file all-or-nothing: into a hidden temp beside it, renamed into place at the end.

A conversion interrupted half way (a corrupt source tensor, a full disk,
Ctrl-C, ``timeout``, a CI cancel) must not leave a destination that looks like
a checkpoint but is not one, nor hundreds of megabytes of hidden temp files.
Building the result in ``<parent>/.<name>.graphfix-tmp-<owner>-*`` and renaming
it once complete makes the destination appear whole or not at all (a rename
within one folder is atomic). The temp folder is deleted:

* on any exception, Ctrl-C (SIGINT) included;
* on SIGTERM and SIGHUP, which by default kill Python without running any
  cleanup: while a temp folder exists, handlers turn them into ``SystemExit(128
  + signal)`` so the cleanup runs, and the previous handlers are restored
  after. Handlers the application installed itself (or ``SIG_IGN``) are left
  alone, and none are installed outside the main thread;
* after SIGKILL or a power cut, by the next run's sweep of stale entries
  (:mod:`graphfix.convert.stale`), which knows the owner from the name.

Cleanup and the final swap run with these signals blocked, so a second signal
cannot interrupt them half way. Failed writes (full disk, read-only folder,
quota) become one-line :class:`~graphfix.errors.OutputError` s, and the
previous destination is left exactly as it was.

A destination that is a symbolic link is replaced as a link: with
``--overwrite`` the link itself is swapped for the new folder and its target is
not touched (graphfix only ever deletes what the user named).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from graphfix.convert.progress import human_bytes
from graphfix.convert.stale import TMP_MARKER, remove_entry, sweep, tmp_prefix
from graphfix.errors import InputError, OutputError

__all__ = ["TMP_MARKER", "atomic_dir", "atomic_write", "check_destination", "output_error"]

#: errno values that mean "this output cannot be written here", whatever file they name
_WRITE_ERRNOS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EFBIG: "a file is larger than the file system or the process's file-size limit allows",
}
_PERMISSION = {errno.EACCES: "permission denied", errno.EPERM: "operation not permitted"}
_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP", "SIGINT") if hasattr(signal, name))


def check_destination(src: Path, dst: Path, *, overwrite: bool) -> None:
    """Refuse destinations that would clobber data: existing ones (unless ``overwrite``) or the source itself."""
    src_r, dst_r = src.resolve(), dst.resolve()
    if dst_r == src_r or src_r in dst_r.parents or dst_r in src_r.parents:
        raise InputError(f"{dst}: the destination overlaps the source {src}; choose a folder outside it")
    if not dst.absolute().parent.is_dir():
        raise InputError(f"{dst.parent}: the destination's parent folder does not exist; create it first")
    if dst.is_symlink():  # replaced as a link; its target is never touched
        if not overwrite:
            raise InputError(f"{dst} already exists (a symbolic link); pass --overwrite to replace the link "
                             "(its target is kept) or choose another destination")
        return
    if dst.exists():
        if not overwrite:
            raise InputError(f"{dst} already exists; pass --overwrite to replace it or choose another destination")
        if not dst.is_dir():
            raise InputError(f"{dst} exists and is not a folder; remove it or choose another destination")


def output_error(dst: Path, exc: BaseException, *, needed: int | None = None) -> OutputError:
    """One line for a write into ``dst`` (or beside it) that failed with ``exc``."""
    code = getattr(exc, "errno", None)
    folder = dst.absolute().parent
    reason = _WRITE_ERRNOS.get(code) or _PERMISSION.get(code)
    free = _free_bytes(folder)
    if reason is None:
        if free is not None and free < 2**20:  # torch's writer reports a full disk without an errno
            code, reason = errno.ENOSPC, "no space left on the device"
        else:
            text = (getattr(exc, "strerror", None) or str(exc)).strip().splitlines()
            reason = text[0] if text else type(exc).__name__
    space = ""
    if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) and free is not None:
        space = f"; {human_bytes(free)} free in {folder}" + (f", {human_bytes(needed)} needed" if needed else "")
    do = ("free space or choose another destination" if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
          else "choose a destination you can write to")
    return OutputError(f"{dst}: cannot write ({reason}{space}); {do}; nothing was written", errno=code)


def _free_bytes(folder: Path) -> int | None:
    try:
        usage = shutil.disk_usage(folder)
    except OSError:
        return None
    return usage.free if usage.total else None  # some virtual file systems report 0 of 0: unknown


def is_write_failure(exc: BaseException, tmp: Path) -> bool:
    """Whether ``exc`` (raised while writing into ``tmp``) is the destination's fault, not the source's."""
    if not isinstance(exc, OSError) or isinstance(exc, InputError):
        return False
    if exc.errno in _WRITE_ERRNOS:
        return True
    name = exc.filename
    return name is not None and str(tmp) in str(name)


@contextmanager
def _signals_to_exit() -> Iterator[None]:
    """SIGTERM/SIGHUP raise ``SystemExit(128 + n)`` and SIGINT ``KeyboardInterrupt`` while inside, so cleanup runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        if signum == getattr(signal, "SIGINT", None):
            raise KeyboardInterrupt
        raise SystemExit(128 + signum)

    previous = {}
    for sig in _SIGNALS:
        current = signal.getsignal(sig)
        if current is signal.SIG_DFL or current is signal.default_int_handler:
            previous[sig] = current
            signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@contextmanager
def _signals_blocked() -> Iterator[None]:
    """Hold SIGTERM/SIGHUP/SIGINT until the block ends (a swap or a cleanup is never cut in half)."""
    mask = getattr(signal, "pthread_sigmask", None)
    if mask is None:  # pragma: no cover - not POSIX
        yield
        return
    old = mask(signal.SIG_BLOCK, _SIGNALS)
    try:
        yield
    finally:
        mask(signal.SIG_SETMASK, old)


def destination_path(dst: Path) -> Path:
    """``dst`` made absolute through its parent only: a link at ``dst`` itself is not followed."""
    dst = Path(dst)
    return dst.absolute().parent.resolve() / dst.name


@contextmanager
def atomic_dir(dst: Path, *, overwrite: bool = False, needed_bytes: int | None = None,
               verbose: bool = True) -> Iterator[Path]:
    """Yield a temp folder next to ``dst``; on success it replaces ``dst``, on any error or signal it is removed.

    Stale leftovers of dead graphfix processes beside ``dst`` are swept first
    (``verbose``: say so on stderr). ``needed_bytes``: refuse up front when the
    file system has less free space than that.
    """
    dst = destination_path(dst)
    parent = dst.parent
    sweep(parent, warn=verbose)
    free = _free_bytes(parent)
    if needed_bytes and free is not None and free < needed_bytes:
        raise OutputError(f"{dst}: not enough free space ({human_bytes(free)} free in {parent}, "
                          f"{human_bytes(needed_bytes)} needed); free space or choose another destination; "
                          "nothing was written", errno=errno.ENOSPC)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=tmp_prefix(dst.name), dir=parent))
    except OSError as exc:
        raise output_error(dst, exc, needed=needed_bytes) from None
    try:
        with _signals_to_exit():
            try:
                yield tmp
                os.chmod(tmp, 0o777 & ~_umask())
                with _signals_blocked():
                    _swap(tmp, dst, overwrite=overwrite)
            except BaseException as exc:
                with _signals_blocked():
                    remove_entry(tmp)
                if isinstance(exc, SystemExit) and isinstance(exc.code, int) and exc.code > 128:
                    print(f"graphfix: stopped by signal {exc.code - 128}; the partial output was removed and "
                          f"{dst} was left as it was", file=sys.stderr)
                if is_write_failure(exc, tmp):
                    raise output_error(dst, exc, needed=needed_bytes) from None
                raise
    finally:
        if tmp.exists():  # a signal between the cleanup above and here
            remove_entry(tmp)


def _swap(tmp: Path, dst: Path, *, overwrite: bool) -> None:
    """Rename ``tmp`` to ``dst``; an existing ``dst`` (folder or link) is moved aside first and removed after."""
    if not (dst.exists() or dst.is_symlink()):
        os.rename(tmp, dst)
        return
    if not overwrite:  # appeared while we were writing
        raise InputError(f"{dst} appeared during the conversion; pass --overwrite to replace it")
    old = dst.parent / (tmp_prefix(dst.name, old=True) + os.urandom(4).hex())
    os.rename(dst, old)
    try:
        os.rename(tmp, dst)
    except BaseException:
        os.rename(old, dst)  # put the previous destination back
        raise
    remove_entry(old)


def atomic_write(path: str | os.PathLike, data: str | bytes) -> None:
    """Write ``data`` to ``path`` whole or not at all (a temp file beside it, renamed over it; removed on error).

    Readers (a second process loading a cache, CI reading a report) never see half a file.
    The parent folder must exist; the file gets the umask's permissions, not ``mkstemp``'s 0600.
    A write the file system refuses raises :class:`~graphfix.errors.OutputError` (an ``OSError``
    too), and the previous file is left as it was.
    """
    target = Path(path)
    sweep(target.absolute().parent, target.name, warn=False)
    try:
        fd, tmp = tempfile.mkstemp(prefix=tmp_prefix(target.name), dir=target.parent)
    except OSError as exc:
        raise output_error(target, exc) from None
    try:
        with os.fdopen(fd, "wb" if isinstance(data, bytes) else "w") as fh:
            fh.write(data)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, target)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and not isinstance(exc, InputError):
            raise output_error(target, exc) from None
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
