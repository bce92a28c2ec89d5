"""Hugging Face model folders: config.json plus *.safetensors (single or sharded) or, only
through `torch.load(weights_only=True)`, *.bin checkpoints."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import ModelFormatError, WeightFileError
from ..models.spec import config_from_hf_dict, read_config_json
from .source import OpenedModel


def normalize_name(name: str, model_type: str) -> str:
    # Original OPT checkpoints omit the `model.` prefix of the causal-LM wrapper.
    if model_type == "opt" and name.startswith("decoder."):
        return "model." + name
    return name


class SafetensorsSource:
    def __init__(self, files: list[Path], model_type: str):
        self._where: dict[str, tuple[Path, str]] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        for file in files:
            try:
                with safe_open(str(file), framework="pt") as f:
                    for raw in f.keys():
                        name = normalize_name(raw, model_type)
                        self._where[name] = (file, raw)
                        self._shapes[name] = tuple(f.get_slice(raw).get_shape())
            except Exception as e:  # safetensors raises its own error types
                raise WeightFileError(f"cannot read {file}: {e}. The file is truncated or not safetensors.") from e

    def names(self) -> set[str]:
        return set(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def read(self, name: str) -> torch.Tensor:
        file, raw = self._where[name]
        try:
            with safe_open(str(file), framework="pt") as f:
                return f.get_tensor(raw)
        except Exception as e:
            raise WeightFileError(f"cannot read tensor {raw!r} from {file}: {e}") from e


class TorchBinSource:
    """Pickle checkpoints, loaded with weights_only=True so no code in the file can run."""

    def __init__(self, files: list[Path], model_type: str):
        self._tensors: dict[str, torch.Tensor] = {}
        for file in files:
            try:
                state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:
                raise WeightFileError(
                    f"cannot load {file} with torch.load(weights_only=True): {e}. "
                    "The file is truncated, corrupted, or contains objects other than tensors."
                ) from e
            for raw, tensor in state.items():
                self._tensors[normalize_name(raw, model_type)] = tensor

    def names(self) -> set[str]:
        return set(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._tensors[name].shape)

    def read(self, name: str) -> torch.Tensor:
        return self._tensors[name]


def _weight_files(folder: Path, suffix: str) -> list[Path]:
    index = next(iter(sorted(folder.glob(f"*{suffix}.index.json"))), None)
    if index is not None:
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise ModelFormatError(f"{index} lists shards that are missing: {', '.join(missing)}")
        return [folder / s for s in shards]
    return sorted(folder.glob(f"*{suffix}"))


def open_hf_folder(folder: Path) -> OpenedModel:
    raw = read_config_json(folder)
    config = config_from_hf_dict(raw, source=str(folder / "config.json"))
    files = _weight_files(folder, ".safetensors")
    if files:
        return OpenedModel(config, SafetensorsSource(files, config.model_type), folder, "hf", raw)
    files = _weight_files(folder, ".bin")
    if files:
        return OpenedModel(config, TorchBinSource(files, config.model_type), folder, "hf", raw)
    raise ModelFormatError(f"{folder} has config.json but no *.safetensors or *.bin weight files.")
