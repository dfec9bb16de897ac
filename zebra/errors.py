"""zebra's own input errors: one family, whatever package raises them, so the command line can tell a bad input
(one line, `error: <what> (<how to fix>)`, exit status 2; zebra.__main__) from a bug (a traceback).

Plain Python with no imports: the model-free packages (compose, data) and the stages raise from here alike.
Subclasses also derive from the builtin a caller would expect (ValueError for a bad value, OSError for a file), so
`except ValueError` around zebra code keeps working.
"""

from __future__ import annotations


class ZebraInputError(Exception):
    """Something the user gave (a config value, a path, a data file, a teacher spec) cannot be used. The message
    names the input and says how to fix it, in one line."""


class ConfigError(ZebraInputError, ValueError):
    """A config value is missing, of the wrong type or out of range."""


class DataError(ZebraInputError, ValueError):
    """A data source is missing, unreadable, empty or lacks the expected fields."""


def one_line(err: BaseException) -> str:
    """The message of `err` on one line (a message that spans lines is joined with spaces)."""
    text = " ".join(part.strip() for part in str(err).splitlines() if part.strip())
    return text or type(err).__name__
