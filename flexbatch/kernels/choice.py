"""Which kernel multiplies by a 4-bit packed weight: torch's fused int4 kernel, or one
dequantization into a dense copy followed by the dense matmul.

The fused kernel reads a quarter of the bytes but computes more slowly; dequantizing costs a
pass over the weight (shared by every GPU batch of a block) and then runs the fast dense
matmul. Which wins depends on the machine and on how many rows are multiplied, so nothing
here measures it: the hardware profile measures both kernels once (profiling/cpu.py), and
the engine is handed the resulting `KernelChoice`, or an explicit one from the top.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from ..errors import ConfigError

ROWS = tuple(1 << i for i in range(12))  # 1 .. 2048: the row counts a crossover is looked for at

Rate = Callable[[int], float]  # FLOP/s of a matmul with that many rows


@dataclass(frozen=True)
class KernelChoice:
    # the fused kernel for up to this many input rows; 0: never (dequantize + matmul runs on
    # every machine, so it is the choice when nothing was measured)
    fused_max_rows: int = 0

    def __post_init__(self):
        if self.fused_max_rows < 0:
            raise ConfigError(f"fused_max_rows must be >= 0, got {self.fused_max_rows}")

    def fused(self, rows: int) -> bool:
        return rows <= self.fused_max_rows

    @classmethod
    def from_rates(cls, fused_flops: Rate, dense_flops: Rate, dequantize_params_per_s: float) -> "KernelChoice":
        """The fused kernel up to the last row count (of ROWS, ascending) at which it beats
        one dequantization plus the dense matmul. Per parameter of the weight, `rows` rows
        cost 2 rows / fused FLOP/s against 1 / dequantization rate + 2 rows / dense FLOP/s."""
        dequantize = 1 / dequantize_params_per_s if dequantize_params_per_s else 0.0
        best = 0
        for rows in ROWS:
            fused = 2 * rows / fused_flops(rows)
            dense = dequantize + 2 * rows / dense_flops(rows)
            if not math.isfinite(fused) or fused >= dense:
                break
            best = rows
        return cls(best)
