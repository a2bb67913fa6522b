"""The one exception type users see: one sentence saying what is wrong and what to do."""


class SdtuneError(Exception):
    """A problem with the user's input or environment; the CLI prints it without a traceback."""
