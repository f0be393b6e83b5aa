"""llama_ref: a reference LLaMA that runs real models offline, on CPU or CUDA.

Importing this package imports torch; explainer code that doesn't run a model must not import it.
"""

from llama_ref.generation import Llama, default_model_path

__all__ = ["Llama", "default_model_path"]
