"""User-facing settings as frozen, validated dataclasses."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .errors import ConfigError

DTYPE_NAMES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
               "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(value: str | torch.dtype | None) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    if value == "auto":
        return None
    if value not in DTYPE_NAMES:
        raise ConfigError(f"dtype {value!r} is not supported; use one of auto, {', '.join(DTYPE_NAMES)}.")
    return DTYPE_NAMES[value]


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclass(frozen=True)
class SamplingParams:
    """How to generate one request's continuation.

    temperature 0 means greedy decoding (the default); top_k 0 and top_p 1 disable those
    filters. `stop` strings end generation when they appear in the generated text and are cut
    from the returned text; `stop_token_ids` and the model's EOS tokens end it too (unless
    `ignore_eos`). With `logprobs`, each generated token's log-probability under the model's
    unmodified distribution is returned.
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    logprobs: bool = False

    def __post_init__(self):
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop or ()))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids or ()))
        _check(isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1,
               f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        _check(self.temperature >= 0, f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        _check(isinstance(self.top_k, int) and self.top_k >= 0, f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        _check(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")
        _check(all(isinstance(s, str) and s for s in self.stop), f"stop must be non-empty strings, got {self.stop!r}")
        _check(self.seed is None or isinstance(self.seed, int), f"seed must be an integer, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0
