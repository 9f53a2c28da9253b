"""The one exception type for user mistakes (bad path, bad flag value, malformed input).

The CLI prints these as a one-line cause on stderr with exit code 2; anything else is a bug
and keeps its traceback.
"""


class UserError(Exception):
    """A problem the user can fix; the message says what and where."""
