"""The command that applies the fixes a report found, said at the end of the text report.

A report that names fix passes leaves the user one step from a faster model: say the
step. The command repeats the MODEL as it was typed (quoted for a shell) and the
``--driver``; a ``config.json`` alone has no weights to rewrite, so it gets no command.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from pathlib import Path

from graphfix.diagnose.report import Report


def _has_weights(spec: str) -> bool:
    path = Path(spec)
    if path.is_file():
        return path.suffix == ".gguf"
    if path.is_dir():
        return any(path.glob("*.safetensors")) or any(path.glob("*.bin")) or any(path.glob("*.pth")) \
            or any(path.glob("*.gguf"))
    return True  # 'smollm2' and package.module:function build real models


def next_step(reports: Sequence[Report], specs: Sequence[str], driver: str | None) -> str:
    """``next: graphfix optimize MODEL --verify  (applies: pass, ...)`` per model with fix passes, or ``""``."""
    lines = []
    for report, spec in zip(reports, specs):
        passes = list(dict.fromkeys(f.fix_pass for f in report.findings if f.fix_pass))
        if not passes or not _has_weights(spec):
            continue
        command = ["graphfix", "optimize", spec] + (["--driver", driver] if driver else []) + ["--verify"]
        lines.append(f"next: {shlex.join(command)}  (applies {', '.join(passes)})")
    return "\n".join(lines)


__all__ = ["next_step"]
