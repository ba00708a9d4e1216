"""stdout holds the output the user asked for, and nothing else.

``graphfix -q report MODEL --format json | python -m json.tool`` must work, yet a model's
forward may ``print``, fairscale prints "> initializing model parallel" when Meta's code
sets up, and C extensions may write to file descriptor 1 directly. So while a command
works, both ``sys.stdout`` and file descriptor 1 point at stderr; the requested output is
written through ``requested_output()``, a stream on the original stdout. ``-q`` also
silences what libraries show on stderr (transformers' and huggingface_hub's progress bars
and load reports, tqdm, Python warnings); graphfix's own errors still print.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from typing import TextIO

_requested: TextIO | None = None

QUIET_ENV = {"TQDM_DISABLE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error",
             "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}


def requested_output() -> TextIO:
    """Where the output the user asked for goes: the real stdout, also inside ``output_only_on_stdout``."""
    return _requested if _requested is not None else sys.stdout


@contextlib.contextmanager
def output_only_on_stdout() -> Iterator[TextIO]:
    """For the duration, everything written to stdout (Python or C level) goes to stderr, except what is written
    to the yielded stream (also ``requested_output()``), which goes to the original stdout."""
    global _requested
    previous = _requested
    real = sys.stdout
    try:
        fd = real.fileno()
    except (AttributeError, OSError, ValueError):  # pytest's capture, a StringIO: no descriptor to move
        fd = -1
    saved = None
    if fd == 1:
        real.flush()
        saved = os.dup(1)
        os.dup2(2, 1)
        out: TextIO = os.fdopen(os.dup(saved), "w", encoding=getattr(real, "encoding", None) or "utf-8",
                                errors="replace", closefd=True)
    else:
        out = real
    _requested = out
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield out
    finally:
        _requested = previous
        try:
            out.flush()
        finally:
            if saved is not None:
                real.flush()
                os.dup2(saved, 1)
                os.close(saved)
                out.close()


@contextlib.contextmanager
def third_party_quiet(quiet: bool) -> Iterator[None]:
    """With ``quiet``: no progress bars, load reports or warnings from libraries (restored afterwards)."""
    if not quiet:
        yield
        return
    saved_env = {k: os.environ.get(k) for k in QUIET_ENV}
    os.environ.update(QUIET_ENV)
    restore = []
    # transformers or huggingface_hub missing or changed: their chatter is not worth failing over
    with contextlib.suppress(Exception):
        from transformers.utils import logging as tf_logging

        level = tf_logging.get_verbosity()
        bars = tf_logging.is_progress_bar_enabled()
        tf_logging.set_verbosity_error()
        tf_logging.disable_progress_bar()
        restore.append(lambda: (tf_logging.set_verbosity(level),
                                tf_logging.enable_progress_bar() if bars else None))
    with contextlib.suppress(Exception):
        from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

        hub_off = are_progress_bars_disabled()
        disable_progress_bars()
        restore.append(lambda: None if hub_off else enable_progress_bars())
    library_loggers = [logging.getLogger(n) for n in ("accelerate", "huggingface_hub", "fairscale")]
    levels = [lg.level for lg in library_loggers]
    for lg in library_loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lv in zip(library_loggers, levels):
            lg.setLevel(lv)
        for undo in reversed(restore):
            undo()
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


__all__ = ["output_only_on_stdout", "requested_output", "third_party_quiet"]
