"""The one exception type for user mistakes (bad path, bad setting, malformed input).

The CLI prints these as a one-line cause on stderr with exit code 2; anything else is a bug
and keeps its traceback. The library names settings by their config field (``data.path``,
``margin``); the CLI, which knows which flag sets that field, shows the flag instead.
"""


class UserError(Exception):
    """A problem the user can fix; the message says what and where.

    Args:
        message: one line: what is wrong and what to do.
        field: the setting at fault (a config field such as ``train.amp`` or a function
            parameter such as ``run_id``), when there is one; the CLI maps it to its flag.
    """

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


def first_line(exc: BaseException) -> str:
    """``Type: first line of the message``: an error named in one line (a run's end reason, a log)."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__
