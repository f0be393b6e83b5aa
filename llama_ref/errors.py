"""Errors a user can act on, in a module that imports nothing heavy (the catalog raises them without torch)."""


class CheckpointError(Exception):
    """A checkpoint that cannot be used. str() is one line: the file, the problem, what to do."""

    def __init__(self, message: str):
        super().__init__(" ".join(message.split()))
