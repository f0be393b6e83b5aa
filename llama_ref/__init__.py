"""llama_ref: a reference LLaMA that runs real models offline, on CPU or CUDA.

`Llama` imports torch, so it is loaded on first use: `llama_ref.catalog` (model names and files)
stays light for explainer code that doesn't run a model.
"""

__all__ = ["Llama", "default_model_path"]


def __getattr__(name: str):
    if name == "Llama":
        from llama_ref.generation import Llama

        return Llama
    if name == "default_model_path":
        from llama_ref.catalog import default_model_path

        return default_model_path
    raise AttributeError(f"module 'llama_ref' has no attribute {name!r}")


# LLAMA_REF_CPU=avx2 (say) must reach torch's, oneDNN's and fbgemm's dispatchers before torch runs anything
from llama_ref.kernels import force_cpu_class as _force_cpu_class  # noqa: E402 - after the docstring's promise

_force_cpu_class()
