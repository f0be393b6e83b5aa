"""llama_ref's errors: one root, so a caller catches LlamaRefError and prints it as one line.

This module imports nothing heavy: the catalog raises these without torch. Each module defines the errors it
raises beside its code (device.DeviceError, tokenizer.TokenizerError, chat.ChatTemplateError,
kernels.KernelError, engine.EngineError, catalog.CatalogError, serve.ServeError), all derived from LlamaRefError;
the ones that were a ValueError or RuntimeError still are.
"""


class LlamaRefError(Exception):
    """Something a user can act on; str() is one line: what happened, where, and what to do."""


class CheckpointError(LlamaRefError):
    """A checkpoint that cannot be used. str() is one line: the file, the problem, what to do."""

    def __init__(self, message: str):
        super().__init__(" ".join(message.split()))
