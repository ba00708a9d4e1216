"""Name temporary outputs after the process that owns them, and sweep the ones whose owner is gone.

A conversion writes into ``.<name>.graphfix-tmp-<owner>-<random>`` beside its
destination and renames it into place at the end. A process killed with
SIGKILL, an OOM kill, a power cut or a container stop cannot clean up after
itself, so the next run must: but only after proving the owner is dead, since
two conversions may run side by side into one folder.

The owner tag is ``<pid>.<start>.<ns>``: the process id, the process's start
time in clock ticks since boot (so a pid reused by a later process is not
mistaken for the owner) and a hash of the boot id and pid namespace (so a pid
is only judged by a process that shares that pid namespace; containers that
share a volume do not judge each other's pids). Entries whose owner cannot be
judged here (another machine or container, or a name written by an older
graphfix without a tag) are swept only when nothing in them has changed for
:data:`FOREIGN_STALE_SECONDS`: a live conversion writes every few seconds.

An ``-old-`` entry is a previous destination moved aside during an
``--overwrite`` swap. If its owner died between the two renames, the
destination is missing and the old folder is the user's data: the sweep puts
it back instead of deleting it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

TMP_MARKER = ".graphfix-tmp-"
OLD = "old-"
#: leftovers this long untouched are stale even when their owner cannot be checked from here
FOREIGN_STALE_SECONDS = 24 * 3600

_TAGGED = re.compile(r"^\.(?P<name>.+)\.graphfix-tmp-(?P<old>old-)?(?P<pid>\d+)\.(?P<start>\d+)\.(?P<ns>[0-9a-f]{8})-")
_LEGACY = re.compile(r"^\.(?P<name>.+)\.graphfix-tmp-(?P<old>old-)?[a-z0-9_]{8}$")


def _start_ticks(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (Linux), None when unknown."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rfind(")") + 2:].split()  # the command name may hold spaces and parentheses
    try:
        return int(fields[19])  # field 22 of proc(5); fields[0] is field 3
    except (IndexError, ValueError):
        return None


def _state(pid: int) -> str | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rfind(")") + 2:].split()[0]


def namespace_tag() -> str:
    """8 hex digits naming this kernel boot and pid namespace (this host name where /proc is absent)."""
    parts = []
    for probe in ("/proc/sys/kernel/random/boot_id", "/proc/self/ns/pid"):
        with contextlib.suppress(OSError):
            parts.append(Path(probe).read_text().strip() if "boot_id" in probe else str(os.stat(probe).st_ino))
    if not parts:
        parts.append(socket.gethostname())
    return hashlib.sha1("|".join(parts).encode()).hexdigest()[:8]


def owner_tag() -> str:
    """``<pid>.<start ticks>.<namespace>`` of this process, for temp names."""
    return f"{os.getpid()}.{_start_ticks(os.getpid()) or 0}.{namespace_tag()}"


def tmp_prefix(name: str, *, old: bool = False) -> str:
    """Prefix for a temp entry beside ``name`` owned by this process (``tempfile`` appends a random part)."""
    return f".{name}{TMP_MARKER}{OLD if old else ''}{owner_tag()}-"


def _pid_alive(pid: int, start: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        pass
    if _state(pid) == "Z":  # killed, not yet reaped: it will never clean up
        return False
    now = _start_ticks(pid)
    return not (start and now is not None and now != start)  # a different process got the pid


def _idle_seconds(path: Path) -> float:
    """Seconds since anything in ``path`` (the entry, or the files directly in it) was last modified.

    Modification times, not change times: a writer touches them every few
    seconds, and they are what tools that copy or restore folders preserve.
    """
    try:
        st = path.lstat()
    except OSError:
        return 0.0
    newest = st.st_mtime
    if path.is_dir() and not path.is_symlink():
        with contextlib.suppress(OSError), os.scandir(path) as it:
            for entry in it:
                with contextlib.suppress(OSError):
                    newest = max(newest, entry.stat(follow_symlinks=False).st_mtime)
    return time.time() - newest


@dataclass(frozen=True)
class Leftover:
    """A temp entry found beside a destination, and whether its owner is gone."""

    path: Path
    name: str  # the destination it belongs to
    old: bool  # a previous destination moved aside, not a partial output
    stale: bool


def find_leftovers(parent: Path, name: str | None = None) -> list[Leftover]:
    """graphfix temp entries in ``parent`` (for destination ``name`` only, when given)."""
    out = []
    ns = namespace_tag()
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return []
    for entry in entries:
        if TMP_MARKER not in entry.name:
            continue
        path = Path(entry.path)
        m = _TAGGED.match(entry.name)
        if m:
            local = m["ns"] == ns
            stale = (not _pid_alive(int(m["pid"]), int(m["start"])) if local
                     else _idle_seconds(path) > FOREIGN_STALE_SECONDS)
        else:
            m = _LEGACY.match(entry.name)
            if not m:
                continue
            stale = _idle_seconds(path) > FOREIGN_STALE_SECONDS
        if name is None or m["name"] == name:
            out.append(Leftover(path, m["name"], bool(m["old"]), stale))
    return out


def remove_entry(path: Path) -> None:
    """Delete a temp file, link or folder (a link is removed itself, never followed)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def sweep(parent: Path, name: str | None = None, *, warn: bool = True) -> list[Path]:
    """Remove stale leftovers in ``parent``; an orphaned ``-old-`` destination is restored, not deleted.

    Returns what was removed or restored. Never raises: a sweep that cannot
    remove something (permissions) leaves it and the conversion goes on.
    """
    done = []
    for item in find_leftovers(parent, name):
        if not item.stale:
            continue
        dst = parent / item.name
        try:
            if item.old and not (dst.exists() or dst.is_symlink()):
                os.rename(item.path, dst)  # the owner died mid-swap: the destination is the user's data
                what = f"restored {dst} from an interrupted --overwrite"
            else:
                remove_entry(item.path)
                what = f"removed {item.path.name}, left by an interrupted graphfix"
        except OSError:
            continue
        done.append(item.path)
        if warn:
            print(f"graphfix: {what}", file=sys.stderr)
    return done
