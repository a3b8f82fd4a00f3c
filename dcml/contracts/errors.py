"""User-facing errors: one line that names the file and the fix."""


class DcmlError(Exception):
    """A problem with the user's input or environment.

    The CLI prints ``error: <message>`` on one line and exits with status 2;
    no traceback, no partial output.
    """

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
