"""The one exception type the command line turns into a one-line message."""


class Vis2IRError(Exception):
    """A problem the user can fix: bad input, a bad setting, missing weights.

    The message is one line that names the file or setting and what was expected. The CLI prints
    it without a traceback and exits with status 2.
    """
