"""One error base for neonctl; the CLI prints ``message`` (and ``hint``) as one line and exits non-zero.

Engine code raises these; anything else reaching the top is a bug and shows a traceback. Each subclass
registers its ``kind`` (its class name) when it is defined, wherever that is: a daemon answers an error with
that kind, and the client raises the same class again (``error_class``).
"""

from __future__ import annotations

_KINDS: dict[str, type[NeonctlError]] = {}


class NeonctlError(Exception):
    exit_code = 1

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if _KINDS.setdefault(cls.__name__, cls) is not cls:
            raise TypeError(f"two NeonctlError subclasses are named {cls.__name__}: error kinds must be unique")

    @property
    def kind(self) -> str:
        return type(self).__name__

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


def error_class(kind: str | None) -> type[NeonctlError] | None:
    """The registered class of an error kind, or None for a kind this process does not know."""
    return _KINDS.get(kind or "")


_KINDS[NeonctlError.__name__] = NeonctlError

