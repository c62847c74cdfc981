"""The one exception type the command line turns into a one-line message."""

from __future__ import annotations


class Vis2IRError(Exception):
    """A problem the user can fix: bad input, a bad setting, missing weights.

    The message is one line that names the file or setting and what was expected. The CLI prints
    it without a traceback and exits with status 2.
    """


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type name when empty), for one-line errors."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def describe(err: BaseException) -> str:
    """'Type: first line of the message', for wrapping a library's error in a one-line error."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__
