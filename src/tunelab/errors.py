"""The one error type users see: a list of problems, each naming what and where, and how to fix it.

The CLI prints it as a paragraph and exits with code 2, never with a traceback.
"""


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
