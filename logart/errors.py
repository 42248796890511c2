"""The one error type users see. Every message names the problem and the fix.

The only module of ours that quant/ imports: it depends on nothing.
"""


class LogartError(ValueError):
    """A problem with the user's input or files. The CLI prints it as one line and exits with code 2."""

    def __init__(self, problem: str, fix: str = ""):
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem}" + (f" Fix: {fix}" if fix else ""))
