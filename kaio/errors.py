"""User-facing errors: each message says what is wrong and how to fix it.

The CLI prints the message as one line (no traceback) and exits with code 2.
``KAIO_DEBUG=1`` shows the traceback.
"""


class KaioError(Exception):
    """An error the user can fix; the message is shown as-is."""

    exit_code = 2


class ConfigError(KaioError):
    """The YAML config is unreadable or invalid."""


class ProjectError(KaioError):
    """Unknown project, project already running, history that would be mixed."""


class ReportError(KaioError):
    """A report or history on disk that cannot be read or rebuilt."""
