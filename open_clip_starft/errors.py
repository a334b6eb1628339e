"""The error types for bad StarFT input, and how commands report them.

``StarftError`` is the base every entry point turns into one line; its kinds let a caller catch one:
``ConfigError`` (a setting or argument), ``DataError`` (a file or sample; ``UntrustedCheckpoint``: a
checkpoint that would run code to load), ``NumericError`` (a non-finite loss or weight), ``StorageError``
(the disk: no space, not writable). Library layers name the value and the fix, never a command-line flag;
a command adds its flag (``with_flag``). This module imports nothing heavy: every command's refusals use it.
"""
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


class ConfigError(StarftError):
    """A setting or argument that cannot work (an unknown name, a value out of range, settings that
    disagree)."""


class DataError(StarftError):
    """A file or sample that cannot be used as given (missing, malformed, crafted, truncated)."""


class UntrustedCheckpoint(DataError):
    """A checkpoint that would run code to load: its pickle needs a global outside the weights-only
    allow-list (a crafted file, or objects that are not weights), or it is a TorchScript archive."""


class NumericError(StarftError):
    """A non-finite loss, gradient or weight."""


class StorageError(StarftError):
    """The disk refused a write (no space left, read-only, permission)."""


def with_flag(error: StarftError, flag: str) -> StarftError:
    """The same kind of error with ``flag: `` in front, for commands that report a library error
    against the flag the value came from."""
    return type(error)(f"{flag}: {error}")


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
