"""The one exception type whose message reaches the user as a single line."""


class BaeError(Exception):
    """A user-facing error: bad input, a mismatched config, a missing file.

    The CLI prints ``error: <message>`` on one line and exits with status 2.
    """
