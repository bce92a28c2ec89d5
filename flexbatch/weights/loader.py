"""Validate a checkpoint against a family's weight specs and load it into memory."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import WeightFileError
from ..models.family import Family
from ..models.spec import ModelConfig
from .source import TensorSource


@dataclass
class ModelWeights:
    """All weights of a model: global tensors by full name, layer tensors by relative name."""

    globals: dict[str, torch.Tensor]
    layers: list[dict[str, torch.Tensor]]


def resolve_names(cfg: ModelConfig, family: Family, source: TensorSource) -> dict[str, str]:
    """Map every required tensor name to the checkpoint name that provides it.

    Raises a WeightFileError listing all missing tensors and shape mismatches at once.
    """
    available = source.names()
    aliases = family.tied_aliases(cfg)
    required = [(s.name, s.shape) for s in family.global_specs(cfg)]
    for j in range(cfg.num_layers):
        prefix = family.layer_prefix(j)
        required += [(prefix + s.name, s.shape) for s in family.layer_specs(cfg)]
    mapping, missing, mismatched = {}, [], []
    for name, shape in required:
        provider = name if name in available else aliases.get(name)
        if provider is None or provider not in available:
            missing.append(name)
            continue
        if tuple(source.shape(provider)) != tuple(shape):
            mismatched.append(f"{provider}: file has {tuple(source.shape(provider))}, config implies {tuple(shape)}")
        mapping[name] = provider
    problems = []
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        problems.append(f"{len(missing)} tensors missing: {shown}")
    if mismatched:
        problems.append("shape mismatches: " + "; ".join(mismatched[:8]))
    if problems:
        raise WeightFileError(
            "the checkpoint does not match its config.json (" + " | ".join(problems) + "). "
            "Check that config.json belongs to these weights."
        )
    return mapping


def layer_weight_grid(cfg: ModelConfig, family: Family, source: TensorSource) -> int | None:
    """The group size that fits the grid the source quantized every layer matrix on (GGUF
    blocks, K-quant sub-blocks), or None if it quantized none: groups of it never straddle
    two of the source's scales, so compressing on it adds little or no error."""
    grid_of = getattr(source, "quant_grid", None)
    if grid_of is None:
        return None
    mapping = resolve_names(cfg, family, source)
    names = [mapping[family.layer_prefix(j) + s.name] for j in range(cfg.num_layers)
             for s in family.layer_specs(cfg) if len(s.shape) == 2]
    grids = {grid_of(n) for n in names} - {None}
    return math.gcd(*grids) if grids else None


def load_weights(cfg: ModelConfig, family: Family, source: TensorSource,
                 dtype: torch.dtype, device: torch.device | str = "cpu") -> ModelWeights:
    """Read every tensor into `device` memory in `dtype`; tied tensors are shared, not copied."""
    mapping = resolve_names(cfg, family, source)
    loaded: dict[str, torch.Tensor] = {}

    def get(name: str) -> torch.Tensor:
        provider = mapping[name]
        if provider not in loaded:
            loaded[provider] = source.read(provider).to(device=device, dtype=dtype).contiguous()
        return loaded[provider]

    globals_ = {s.name: get(s.name) for s in family.global_specs(cfg)}
    layers = []
    for j in range(cfg.num_layers):
        prefix = family.layer_prefix(j)
        layers.append({s.name: get(prefix + s.name) for s in family.layer_specs(cfg)})
    return ModelWeights(globals_, layers)
