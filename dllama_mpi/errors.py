"""The one exception type users see as a clean message (no traceback)."""


class DllamaError(Exception):
    """A user-facing error: bad input, bad file, impossible configuration."""
