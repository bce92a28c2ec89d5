"""The common interface of weight sources, and detection of what kind a path is."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from ..errors import ModelFormatError
from ..models.spec import ModelConfig


class TensorSource(Protocol):
    """Read-only access to a checkpoint's tensors by (normalised) name, loaded on demand."""

    def names(self) -> set[str]: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def read(self, name: str) -> torch.Tensor: ...


@dataclass
class OpenedModel:
    """A model on disk: its config, its tensors, and where its tokenizer can be loaded from."""

    config: ModelConfig
    source: TensorSource
    path: Path
    kind: str  # "hf" | "gguf" | "store"
    hf_config: dict  # the config as a Hugging Face config.json would hold it

    def load_tokenizer(self):
        from ..tokenizer import load_tokenizer

        return load_tokenizer(self.path, self.kind)


def open_model(path: str | Path) -> OpenedModel:
    """Open a HF folder, a .gguf file, or a converted store, reading only metadata."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ModelFormatError(f"model path {path} does not exist.")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelFormatError(
                f"{path} is a file but not a .gguf file. Pass a .gguf file or a model folder."
            )
        from .gguf_file import open_gguf

        return open_gguf(path)
    from .store import STORE_INDEX, open_store

    if (path / STORE_INDEX).is_file():
        return open_store(path)
    from .hf import open_hf_folder

    return open_hf_folder(path)
