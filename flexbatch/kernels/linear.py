"""One entry for a linear layer whatever the weight's format: a dense tensor, or any packed
format with its own `linear(x, bias)` (today `PackedLinear`). Models call `linear` and never
look at the format."""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F

from .packed import PackedLinear

Weight = torch.Tensor | PackedLinear


def linear(x: torch.Tensor, weight: Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T + bias."""
    if isinstance(weight, torch.Tensor):
        return F.linear(x, weight, bias)
    return weight.linear(x, bias)


def dequantize_for_block(weights: Iterable[Weight], rows: int) -> None:
    """Let each packed weight pick its kernel for the `rows` a block multiplies by it (see
    `PackedLinear.prepare`); dense weights need nothing."""
    for w in weights:
        if isinstance(w, PackedLinear):
            w.prepare(rows)
