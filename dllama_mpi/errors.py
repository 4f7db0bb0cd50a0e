"""The one exception type users see as a clean message (no traceback)."""


class DllamaError(Exception):
    """A user-facing error: bad input, bad file, impossible configuration."""


class StartupFailed(SystemExit):
    """Raised on every rank when the root reported a start-up error (already printed on
    stderr by the root). `message` is that error's text, the same on every rank."""

    def __init__(self, code: int = 1, message: str = ""):
        super().__init__(code)
        self.message = message
