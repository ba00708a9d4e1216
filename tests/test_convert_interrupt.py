"""Conversions that end badly: signals mid-write, SIGKILL and the next run's sweep, full and read-only disks, links.

The signal tests run the real CLI in a subprocess on a tiny checkpoint made
slow by a test hook (each source tensor read sleeps), not by size, and
interrupt it once the temp folder exists. In every case the destination is
either the complete new checkpoint or exactly what was there before, and
nothing else is left beside it.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from graphfix.cli.app import main
from graphfix.convert import atomic, convert
from graphfix.convert.stale import FOREIGN_STALE_SECONDS, TMP_MARKER, namespace_tag, owner_tag, sweep
from graphfix.errors import InputError, OutputError
from tests.conftest_convert import tiny_hf

#: the CLI with every source tensor read slowed down; touches argv[1] once writing has begun
_SLOW_CLI = """
import signal, sys, time
from pathlib import Path
signal.signal(signal.SIGINT, signal.default_int_handler)  # as in an interactive shell
signal.signal(signal.SIGTERM, signal.SIG_DFL)
import graphfix.convert.formats.hf as hf
real = hf.read_tensor
def slow(t, rows=None):
    Path(sys.argv[1]).touch()
    time.sleep(2)
    return real(t, rows)
hf.read_tensor = slow
from graphfix.cli.app import main
sys.exit(main(sys.argv[2:]))
"""
#: the CLI under a 60 KB file-size limit: the real writers (torch's zip writer for Meta) fail half way, as on a full disk
_LIMITED_CLI = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (60000, 60000))
from graphfix.cli.app import main
codes = [main(["-q", "convert", sys.argv[1], sys.argv[2], "--to", to, "--overwrite"]) for to in ("meta", "hf")]
sys.exit(10 * codes[0] + codes[1])
"""


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("interrupt")
    tiny_hf(root / "hf", heads=4, kv_heads=2)
    return root / "hf"


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.getcwd(), "PYTHONDONTWRITEBYTECODE": "1"}


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if TMP_MARKER in p.name)


def _previous(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "keep.txt").write_text("previous checkpoint")
    return folder


@pytest.fixture(scope="module")
def runs(src, tmp_path_factory):
    """Every subprocess of this module, started at once so their start-up (importing torch) overlaps.

    ``name -> (process, folder)``: ``term``/``int``/``kill`` convert slowly into ``folder/out`` (an existing
    destination, with --overwrite, for term and int) and touch ``folder/started`` once writing has begun;
    ``disk`` converts to Meta then HF under a file-size limit.
    """
    root = tmp_path_factory.mktemp("runs")
    procs = {}
    for name in ("term", "int", "kill"):
        folder = root / name
        folder.mkdir()
        extra = ["--overwrite"] if name != "kill" else []
        if extra:
            _previous(folder / "out")
        argv = [sys.executable, "-c", _SLOW_CLI, str(folder / "started"), "-q", "convert", str(src),
                str(folder / "out"), "--to", "meta", *extra]
        procs[name] = (subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env()),
                       folder)
    disk = _previous(root / "disk" / "out").parent
    procs["disk"] = (subprocess.Popen([sys.executable, "-c", _LIMITED_CLI, str(src), str(disk / "out")],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env()), disk)
    yield procs
    for proc, _ in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def _wait_started(proc: subprocess.Popen, folder: Path) -> None:
    deadline = time.monotonic() + 180
    while not (folder / "started").exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the conversion never started writing"
        time.sleep(0.05)
    assert _leftovers(folder), "the temp folder should exist while writing"


@pytest.mark.slow
@pytest.mark.parametrize("name,sig,code", [("term", signal.SIGTERM, 128 + signal.SIGTERM), ("int", signal.SIGINT, 130)],
                         ids=["SIGTERM", "SIGINT"])
def test_signal_mid_conversion_removes_the_temp_folder(runs, name, sig, code):
    proc, folder = runs[name]
    _wait_started(proc, folder)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert _leftovers(folder) == []
    out = folder / "out"
    assert [p.name for p in out.iterdir()] == ["keep.txt"]  # the previous destination, untouched
    assert (out / "keep.txt").read_text() == "previous checkpoint"


@pytest.mark.slow
def test_sigkill_leftover_is_swept_by_the_next_run(runs, src, capsys):
    proc, folder = runs["kill"]
    _wait_started(proc, folder)
    proc.kill()
    proc.communicate(timeout=60)
    stale = _leftovers(folder)
    assert len(stale) == 1 and f"-tmp-{proc.pid}." in stale[0]  # SIGKILL: nothing could clean up
    assert main(["convert", str(src), str(folder / "out"), "--to", "meta"]) == 0
    assert _leftovers(folder) == [] and (folder / "out" / "params.json").is_file()
    assert f"removed {stale[0]}, left by an interrupted graphfix" in capsys.readouterr().err


@pytest.mark.slow
def test_full_disk_in_the_real_writers_is_one_line_and_keeps_the_old_destination(runs):
    proc, folder = runs["disk"]
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 22, err  # 2 for Meta, 2 for HF; never 134: torch's writer must not abort the process
    lines = err.strip().splitlines()
    assert len(lines) == 2 and "Traceback" not in err
    assert all(line.startswith(f"graphfix: error: {folder / 'out'}: cannot write (a file is larger than")
               for line in lines)
    assert [p.name for p in (folder / "out").iterdir()] == ["keep.txt"] and _leftovers(folder) == []


def _dead_owner() -> str:
    """The owner tag of a process that has exited (its pid is free)."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.3)"])
    tag = f"{child.pid}.{_start_of(child.pid)}.{namespace_tag()}"
    child.wait()
    return tag


def test_sweep_judges_owners(tmp_path):
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live_tag = f"{live.pid}.{_start_of(live.pid)}.{namespace_tag()}"
        dead = _dead_owner()
        entries = {
            "mine": f".a{TMP_MARKER}{owner_tag()}-x1",  # this process: alive
            "live": f".b{TMP_MARKER}{live_tag}-x2",  # another live process
            "dead": f".c{TMP_MARKER}{dead}-x3",  # its owner exited
            "reused": f".d{TMP_MARKER}{live.pid}.1.{namespace_tag()}-x4",  # pid alive, but started at another time
            "foreign": f".e{TMP_MARKER}1.1.00000000-x5",  # another machine or container, recent
            "foreign-old": f".f{TMP_MARKER}1.1.00000000-x6",  # another machine, untouched for two days
            "legacy": f".g{TMP_MARKER}abcd1234",  # an older graphfix's name: cannot tell, recent
        }
        for name in entries.values():
            (tmp_path / name).mkdir()
            (tmp_path / name / "part.bin").write_bytes(b"x")
        old = time.time() - 2 * FOREIGN_STALE_SECONDS
        for p in (tmp_path / entries["foreign-old"], tmp_path / entries["foreign-old"] / "part.bin"):
            os.utime(p, (old, old))
        # an --overwrite swap whose owner died between its renames: the destination is the -old- folder
        orphan = tmp_path / f".h{TMP_MARKER}old-{dead}-x7"
        orphan.mkdir()
        (orphan / "weights").write_text("the user's previous checkpoint")
        swept = sweep(tmp_path, warn=False)
    finally:
        live.kill()
        live.wait()
    kept = {name for name, entry in entries.items() if (tmp_path / entry).exists()}
    assert kept == {"mine", "live", "foreign", "legacy"}
    assert len(swept) == 4
    assert (tmp_path / "h" / "weights").read_text() == "the user's previous checkpoint" and not orphan.exists()


def _start_of(pid: int) -> int:
    raw = Path(f"/proc/{pid}/stat").read_text() if Path(f"/proc/{pid}/stat").exists() else ""
    return int(raw[raw.rfind(")") + 2:].split()[19]) if raw else 0


def test_overwrite_replaces_a_symlink_not_its_target(src, tmp_path):
    target = tmp_path / "target"
    target.mkdir()
    (target / "keep.txt").write_text("the link's target")
    (tmp_path / "out").symlink_to(target, target_is_directory=True)
    with pytest.raises(InputError, match="a symbolic link.*pass --overwrite"):
        convert(src, tmp_path / "out", to="meta", progress=False)
    convert(src, tmp_path / "out", to="meta", overwrite=True, progress=False)
    out = tmp_path / "out"
    assert not out.is_symlink() and (out / "params.json").is_file()
    assert [p.name for p in target.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "target"]  # no -old- link left behind


def test_not_enough_free_space_is_refused_before_writing(src, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(atomic.shutil, "disk_usage", lambda p: SimpleNamespace(total=10**9, used=10**9, free=5000))
    assert main(["convert", str(src), str(tmp_path / "out"), "--to", "hf"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not enough free space (5.0 KB free" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("to", ["meta", "hf"])
def test_no_space_while_writing(src, tmp_path, monkeypatch, capsys, to):
    def full(self, *args):
        raise OSError(errno.ENOSPC, "No space left on device")

    from graphfix.convert.formats import pth_io, safetensors_io

    monkeypatch.setattr(pth_io.PthWriter if to == "meta" else safetensors_io.SafetensorsWriter, "write", full)
    (tmp_path / "out").mkdir()
    assert main(["convert", str(src), str(tmp_path / "out"), "--to", to, "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot write (no space left on the device" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and not any((tmp_path / "out").iterdir())


def test_read_only_destination(src, tmp_path, monkeypatch, capsys):
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(tmp_path / ".out.tmp"))

    monkeypatch.setattr(atomic.tempfile, "mkdtemp", read_only)
    assert main(["convert", str(src), str(tmp_path / "out"), "--to", "meta"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot write (the file system is read-only); choose a destination" in err
    monkeypatch.setattr(atomic.tempfile, "mkstemp", read_only)
    with pytest.raises(OSError, match="read-only") as info:  # still an OSError for callers that catch those
        atomic.atomic_write(tmp_path / "report.json", "{}")
    assert isinstance(info.value, OutputError) and info.value.errno == errno.EROFS
    assert sorted(p.name for p in tmp_path.iterdir()) == []
