"""User-facing errors.

Every problem a user can fix (a missing file, a malformed config, an unsupported
architecture, a prompt longer than the cache) is raised as a ``GraphfixError``
whose message is one line that says what is wrong and what to do. The CLI prints
that line and exits with code 2; a traceback is shown only with ``--debug``.
"""

from __future__ import annotations


class GraphfixError(Exception):
    """A problem with the user's input, reported as one line (CLI exit code 2)."""

    exit_code = 2

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        self.message = message
        self.hint = hint
        super().__init__(f"{message} ({hint})" if hint else message)


class InputError(GraphfixError):
    """A path, file or argument given by the user is missing or malformed."""


class UnsupportedModelError(GraphfixError):
    """The model's architecture is not one graphfix can handle."""


class ModelRunError(GraphfixError):
    """The model failed when run in eager mode, before any compilation."""


class OutputError(InputError, OSError):
    """An output could not be written (full disk, read-only folder, no permission).

    Also an ``OSError`` (with ``errno`` set when known), so callers that
    caught the operating system's error before keep working.
    """

    def __init__(self, message: str, *, errno: int | None = None, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.errno = errno
