"""Errors about what the user gave us (files, URLs, model names): shown without a traceback."""


class InputError(ValueError):
    """Bad input: the message names the input and the problem."""
