"""The one error type users see: a list of problems, each naming what and where, and how to fix it.

The CLI prints it as a paragraph and exits with code 2, never with a traceback.
"""

from pathlib import Path


class UserError(Exception):
    """Bad input: a file, a flag, a model reference. Carries every problem found, not only the first."""

    def __init__(self, problems):
        if isinstance(problems, str):
            problems = [problems]
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))

    @staticmethod
    def raise_if(problems):
        if problems:
            raise UserError(problems)


class Stopped(Exception):
    """A run stopped on a signal after saving what it had: the CLI prints the message and exits with `code`
    (130 for SIGINT, 143 for SIGTERM)."""

    def __init__(self, message, code):
        super().__init__(message)
        self.code = code


def utf8_text(path):
    """The text of file `path`; a UserError naming the line and byte where it is not UTF-8."""
    raw = Path(path).read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise UserError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x} at byte offset {e.start}): "
                        "save the file as UTF-8") from None
