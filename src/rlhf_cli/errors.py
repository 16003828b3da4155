"""One exception for bad input: the CLI prints its message as one sentence and exits 2."""


class UserError(Exception):
    """Bad input from the user (config, data, checkpoint, paths). The message is one sentence."""

