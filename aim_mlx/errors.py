"""The project's one base error: the CLI reports exactly these as one clean line."""


class AimMlxError(Exception):
    """A user-facing error: the message says what went wrong, where, and what to do."""


class OptionError(AimMlxError, ValueError):
    """An option value that cannot be used (the command line reports it as a usage error)."""


class OutputError(AimMlxError, OSError):
    """An output location that cannot be created or written; the message names the path."""


class SettingError(AimMlxError, ValueError):
    """An environment variable whose value cannot be used; the message names the variable."""
