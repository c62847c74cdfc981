"""The data package's error: a bad file, a bad layout or a bad data setting, named in one line."""

from __future__ import annotations

from vis2ir.errors import Vis2IRError, describe  # noqa: F401 (describe: re-exported for the data package)


class DataError(Vis2IRError):
    """A data problem; the message names the file (or folder, or setting) and what is wrong.

    A `torch.utils.data.DataLoader` re-raises a worker's exception as `DataError(<whole traceback>)`;
    the constructor keeps only the original one-line message, so the CLI still prints one line.
    """

    def __init__(self, message: str):
        marker = f"{type(self).__module__}.{type(self).__qualname__}: "
        if "Original Traceback" in message and marker in message:
            message = message[message.rindex(marker) + len(marker):].strip()
        super().__init__(message)

