"""The one exception type user mistakes raise; the CLI prints it as a single line."""


class LorakitError(ValueError):
    """A bad input or file: the message says what, where, and how to fix it."""
