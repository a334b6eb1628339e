"""The one error type for bad StarFT input, and how commands report it."""
from __future__ import annotations

import functools
import sys


def one_line(exc, limit: int = 200) -> str:
    """``exc`` (an exception, or any text) as one line of at most ``limit`` characters: whitespace runs
    (newlines included) collapse to one space, and a longer text is cut with a trailing ``…``."""
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[:limit] + "…"


class StarftError(ValueError):
    """A bad input to StarFT. Its message is one line that names the input and the fix.

    Entry points catch it and print ``open-clip-starft: error: <message>`` with no traceback.
    """


def one_line_errors(main, prog: str = "open-clip-starft"):
    """Wrap a command's ``main(argv) -> int``: a ``StarftError`` becomes ``PROG: error: <message>`` on
    stderr and exit status 2, with no traceback."""
    @functools.wraps(main)
    def wrapped(argv=None) -> int:
        try:
            return main(argv)
        except StarftError as e:
            print(f"{prog}: error: {e}", file=sys.stderr)
            return 2
    return wrapped
