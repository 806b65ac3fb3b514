"""The one error type users see: a one-line message, no traceback."""


class AtlasError(Exception):
    """A user-facing error; the CLI prints `error: <message>` and exits 2."""
