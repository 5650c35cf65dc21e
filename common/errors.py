"""The one exception type whose message reaches the user as a single line."""


class BaeError(Exception):
    """A user-facing error: bad input, a mismatched config, a missing file.

    The CLI prints ``error: <message>`` on one line and exits with status 2.
    """


def first_line(exc: BaseException, limit: int = 160) -> str:
    """The first line of an exception's message, cut at ``limit`` characters (for one-line errors
    that quote a library's multi-line message)."""
    lines = str(exc).strip().splitlines()
    return lines[0][:limit] if lines else type(exc).__name__
