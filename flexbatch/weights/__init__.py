"""Files to tensors: Hugging Face folders, GGUF files and flexbatch's converted store."""
from .loader import ModelWeights, load_weights
from .source import TensorSource, open_model

__all__ = ["ModelWeights", "TensorSource", "load_weights", "open_model"]
