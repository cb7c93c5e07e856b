"""One error base for neonctl; the CLI prints ``message`` (and ``hint``) as one line and exits non-zero.

Engine code raises these; anything else reaching the top is a bug and shows a traceback.
"""

from __future__ import annotations


class NeonctlError(Exception):
    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} (hint: {self.hint})"


class InvalidInput(NeonctlError):
    """The user asked for something malformed; nothing was changed."""

    exit_code = 2


class NotFound(NeonctlError):
    """A named project, branch, endpoint or timeline does not exist."""


class AlreadyExists(NeonctlError):
    pass


class Conflict(NeonctlError):
    """The request is well-formed but clashes with current state (running endpoint, port in use, ...)."""


class DaemonError(NeonctlError):
    """A storage daemon is not running, failed to start, or answered with an error."""


class PostgresError(NeonctlError):
    """Postgres binaries are missing/too old, or a compute failed to start or stop."""


class CorruptData(NeonctlError):
    """A checksum or format check failed on stored data; the file is named in the message."""


class Timeout(NeonctlError):
    pass


class RemoteStorageError(NeonctlError):
    """Remote storage (a directory or an S3 bucket) failed a request or does not hold what it should."""


class Unauthorized(NeonctlError):
    """A daemon refused a request without the project's API credential."""
