"""The one error type for bad StarFT input."""


class StarftError(ValueError):
    """A bad input to StarFT. Its message is one line that names the input and the fix.

    Entry points catch it and print ``open-clip-starft: error: <message>`` with no traceback.
    """
