"""flexbatch: high-throughput batch generation with LLMs on hardware that cannot hold them."""
from .config import SamplingParams
from .malloc import keep_freed_memory

keep_freed_memory()  # before any thread allocates: see malloc.py

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "__version__"]


def __getattr__(name):
    # Importing the API pulls in torch and transformers; do it only when asked.
    if name == "LLM":
        from .api import LLM

        return LLM
    raise AttributeError(name)
