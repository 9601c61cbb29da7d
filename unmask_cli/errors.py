"""One exception type for every user-facing failure: a one-line message naming the file and the reason."""

from __future__ import annotations

import os


class UnmaskError(Exception):
    """An error the user can act on. ``str(err)`` is a single line; the CLI prints it without a traceback."""

    exit_code = 1

    def __init__(self, message: str, path: str | os.PathLike | None = None):
        message = " ".join(str(message).split())  # always one line
        if path is not None:
            message = f"{os.fspath(path)}: {message}"
        super().__init__(message)
        self.path = path


class ConfigError(UnmaskError):
    """Bad configuration key or value (exit code 2, like a usage error)."""

    exit_code = 2


class BadInput(UnmaskError):
    """One input file cannot be used (unreadable, corrupt, not an image, no face ...).

    Batch commands record it and go on; ``reason`` is a short machine-friendly tag for summaries.
    """

    def __init__(self, message: str, path: str | os.PathLike | None = None, reason: str = "bad input"):
        super().__init__(message, path)
        self.reason = reason
