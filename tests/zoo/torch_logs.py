"""An independent record of what torch itself logs about a zoo model: ``TORCH_LOGS=graph_breaks,recompiles``.

graphfix's own report comes from its capture code; this module deliberately shares
none of it (no graphfix import), so tests can compare the two. It runs the zoo
entry's own loop in a fresh interpreter with the instance's forward compiled the way
graphfix runs it (``model.forward = torch.compile(model.forward, backend=...)``), and
parses the ``[__graph_breaks]`` and ``[__recompiles]`` records from stderr.
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]

TOKENS_MARK = "ZOO_TOKENS_JSON:"

_CHILD = f"""
import json, sys
import torch
import tests.zoo as zoo
name, backend, steps, passes = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
model, loop = zoo.load(name)
if passes:  # graphfix only rewrites the model here; what is logged stays torch's own record
    from graphfix.rewrite.planner import apply_passes
    apply_passes(model, passes.split(","))
model.forward = torch.compile(model.forward, backend=backend)
ids = loop(model, steps)
print({TOKENS_MARK!r} + json.dumps(ids.tolist()), flush=True)
"""

# "[rank0]:V1203 10:07:42.169000 13265 torch/_dynamo/symbolic_convert.py:5124] [0/0] [__graph_breaks] message"
_RECORD_LINE = re.compile(
    r"^(?:\[rank\d+\]:)?[A-Z]\d{4} [\d:.]+\s+\d+ [^\]]*\](?: \[[^\]]*\])* \[__(graph_breaks|recompiles)\] ?(.*)$")
_BREAK_AT = re.compile(r"Graph break in user code at (.+):(\d+)\s*$")
_RECOMPILING = re.compile(r"Recompiling function (\S+) in (.+):(\d+)\s*$")
_GUARD = re.compile(r"^\s*- [\d/]+: (.*?)(?:\s{2,}#.*)?$")
_GENERIC_REASON = re.compile(r"^(Encountered graph break|Failed to handle graph break|Graph Break Reason:\s*$)")


@dataclass(frozen=True)
class Recompile:
    function: str
    file: str
    line: int
    guard: str
    """The first failing guard Dynamo lists (the one of the most recent cache entry), its source comment dropped."""


@dataclass
class TorchLog:
    breaks: list[tuple[str, int, str]] = field(default_factory=list)
    """Every logged graph break: ``(file, line, first line of the reason)``, in log order."""
    recompiles: list[tuple[str, str]] = field(default_factory=list)
    """Every logged recompile: ``(function name, failing guard text)``, in log order."""
    recompile_records: list[Recompile] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    """The ids the compiled loop generated (batch row 0)."""
    raw: str = ""
    """torch's stderr, unparsed."""

    @property
    def break_sites(self) -> list[tuple[str, int]]:
        """The distinct ``(file, line)`` of the breaks, in first-seen order."""
        return list(dict.fromkeys((file, line) for file, line, _ in self.breaks))


def _records(stderr: str) -> list[tuple[str, list[str]]]:
    """``[(tag, message lines)]``: one entry per ``graph_breaks``/``recompiles`` record, log prefixes removed."""
    records: list[tuple[str, list[str]]] = []
    for raw_line in stderr.splitlines():
        match = _RECORD_LINE.match(raw_line)
        if not match:
            continue
        tag, message = match.groups()
        starts = _BREAK_AT.search(message) if tag == "graph_breaks" else _RECOMPILING.search(message)
        if starts or not records or records[-1][0] != tag:
            records.append((tag, [message]))
        else:
            records[-1][1].append(message)
    return records


def _break_reason(lines: list[str]) -> str:
    """The first specific line of a break's reason (past Dynamo's generic "Encountered graph break ..." preamble)."""
    reason_lines: list[str] = []
    for line in lines[1:]:
        text = line.strip()
        if text.startswith("User code traceback:"):
            break
        if text.startswith("Graph Break Reason:"):
            text = text[len("Graph Break Reason:"):].strip()
        if text:
            reason_lines.append(text)
    specific = [text for text in reason_lines if not _GENERIC_REASON.match(text)]
    return (specific or reason_lines or [""])[0]


def parse(stderr: str) -> TorchLog:
    """A ``TorchLog`` of torch's ``graph_breaks,recompiles`` log text."""
    log = TorchLog(raw=stderr)
    for tag, lines in _records(stderr):
        if tag == "graph_breaks":
            where = _BREAK_AT.search(lines[0])
            if where:
                log.breaks.append((where.group(1), int(where.group(2)), _break_reason(lines)))
            continue
        where = _RECOMPILING.search(lines[0])
        if not where:
            continue
        guards = [m.group(1).strip() for m in map(_GUARD.match, lines[1:]) if m]
        record = Recompile(where.group(1), where.group(2), int(where.group(3)), guards[0] if guards else "")
        log.recompile_records.append(record)
        log.recompiles.append((record.function, record.guard))
    return log


LOG_STEPS = 32
"""Decode steps of a logged run: enough for prefill, the first decodes, a cache growing to Dynamo's recompile limit
and decodes that must not recompile; test_zoo and test_zoo_optimize both read runs of this length."""


def torch_logged(name: str, backend: str = "eager", steps: int = LOG_STEPS, timeout: float = 600.0,
                 passes: Sequence[str] = ()) -> TorchLog:
    """Run zoo entry ``name``'s loop (``steps`` decode steps) with its forward compiled, in a subprocess under
    ``TORCH_LOGS=graph_breaks,recompiles``; what torch logged, parsed.

    ``passes``: graphfix passes applied to the model first (to see what breaks they uncover); the
    record itself is still torch's log, parsed here.

    Raises ``RuntimeError`` with the end of stderr when the subprocess fails.
    """
    env = dict(os.environ, TORCH_LOGS="graph_breaks,recompiles")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-c", _CHILD, name, backend, str(steps), ",".join(passes)], check=False,
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"zoo entry {name!r} failed under torch.compile (exit {proc.returncode}):\n"
                           + proc.stderr[-4000:])
    log = parse(proc.stderr)
    for line in proc.stdout.splitlines():
        if line.startswith(TOKENS_MARK):
            log.tokens = json.loads(line[len(TOKENS_MARK):])[0]
    return log


def torch_logged_once(name: str, backend: str = "eager", steps: int = LOG_STEPS, passes: Sequence[str] = ()) -> TorchLog:
    """``torch_logged``, run once per process for each set of arguments (callers only read the ``TorchLog``).

    A logged run is a fresh interpreter importing torch and compiling the entry's loop, several seconds each:
    test_zoo checks these records for plausibility and test_zoo_optimize compares graphfix's reports with the
    same records, so a whole-suite run starts each subprocess once instead of once per module.
    """
    return _logged(name, backend, steps, tuple(passes))  # one key however the arguments were spelled


@functools.cache
def _logged(name: str, backend: str, steps: int, passes: tuple[str, ...]) -> TorchLog:
    return torch_logged(name, backend, steps, passes=passes)
