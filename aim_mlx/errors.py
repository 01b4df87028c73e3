"""The project's one base error: the CLI reports exactly these as one clean line."""


class AimMlxError(Exception):
    """A user-facing error: the message says what went wrong, where, and what to do."""
