"""The one error type users see: a single line saying what was expected, what was found, what to do.

Library code raises `SdcError`; the CLI prints its message (no traceback unless --debug) and exits
with `exit_code`. Anything else escaping is a bug and keeps its traceback.
"""


class SdcError(Exception):
    exit_code = 2

    def __init__(self, message: str):
        super().__init__(" ".join(message.split()))  # always one line


class ParityError(SdcError):
    """A graph's ONNX output does not match its torch module: the build is refused."""

    exit_code = 3
