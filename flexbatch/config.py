"""User-facing settings as frozen, validated dataclasses."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .errors import ConfigError
from .kernels.quant import QuantConfig
from .structured import ResponseFormat

DEFAULT_COMPRESS_GROUP = 64  # FlexGen's group size, for sources not already quantized on a grid
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


MAX_TOP_LOGPROBS = 20  # OpenAI's limit on alternatives per token


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)



COMPRESS_IF_FASTER = "if faster"  # compress_cache as planned: the planner decides (planner/cache_compression.py)

@dataclass(frozen=True)
class SamplingParams:
    """How to generate one request's continuation.

    temperature 0 means greedy decoding (the default); top_k 0 and top_p 1 disable those
    filters. `stop` strings end generation when they appear in the generated text and are cut
    from the returned text; `stop_token_ids` and the model's EOS tokens end it too (unless
    `ignore_eos`). With `logprobs`, each generated token's log-probability under the model's
    unmodified distribution is returned; `top_logprobs` N > 0 adds, per generated token, the
    N most likely tokens and their log-probabilities (OpenAI's top alternatives; implies logprobs).
    `response_format` (OpenAI's form, e.g. {"type": "json_schema", "json_schema": {"name": ...,
    "schema": {...}}} or {"type": "json_object"}) masks each step's tokens so the text is JSON
    matching the schema; a text cut short by max_new_tokens (finish_reason "length") may not
    parse. Logprobs stay those of the unmasked distribution.
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
    top_logprobs: int = 0
    response_format: ResponseFormat | None = None

    def __post_init__(self):
        object.__setattr__(self, "response_format", ResponseFormat.parse(self.response_format))
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop or ()))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids or ()))
        _check(isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1,
               f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        _check(math.isfinite(self.temperature) and self.temperature >= 0,
               f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature}")
        _check(isinstance(self.top_k, int) and self.top_k >= 0,
               f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        _check(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")
        _check(all(isinstance(s, str) and s for s in self.stop), f"stop must be non-empty strings, got {self.stop!r}")
        _check(self.seed is None or (isinstance(self.seed, int) and -(2**63) <= self.seed < 2**64),
               f"seed must be an integer in [-2**63, 2**64), got {self.seed!r}")
        _check(isinstance(self.top_logprobs, int) and 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS,
               f"top_logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}], got {self.top_logprobs!r}")
        if self.top_logprobs:
            object.__setattr__(self, "logprobs", True)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @classmethod
    def from_hf(cls, max_new_tokens: int = 64, do_sample: bool | None = None, temperature: float | None = None,
                top_p: float | None = None, top_k: int | None = None, stop=None, seed: int | None = None,
                **others) -> "SamplingParams":
        """SamplingParams from Hugging Face `generate()` keywords (FlexGen's README dialect).

        As in transformers, do_sample=False is greedy whatever the temperature, and do_sample=True
        samples at temperature 1 unless one is given; without do_sample, a temperature > 0
        samples (flexbatch's own rule). `stop` is a string, a token id (FlexGen's form), or a
        list of either.
        """
        _check(not others, f"generate() got unsupported keyword(s) {', '.join(sorted(others))}; supported: "
                           "max_new_tokens, do_sample, temperature, top_p, top_k, stop, seed")
        if do_sample is False:
            temperature = 0.0
        elif do_sample and temperature is None:
            temperature = 1.0
        stops = [] if stop is None else [stop] if isinstance(stop, (str, int)) else list(stop)
        stop_ids = tuple(s for s in stops if isinstance(s, int) and not isinstance(s, bool))
        _check(all(isinstance(s, str) or s in stop_ids for s in stops),
               f"stop must be strings or token ids, got {stop!r}")
        return cls(max_new_tokens=max_new_tokens, temperature=temperature or 0.0,
                   top_p=1.0 if top_p is None else top_p, top_k=top_k or 0, seed=seed,
                   stop=tuple(s for s in stops if isinstance(s, str)), stop_token_ids=stop_ids)


def _fraction_pair(name: str, on_device: float, on_host: float) -> None:
    _check(0 <= on_device <= 1 and 0 <= on_host <= 1,
           f"{name} fractions must each be in [0, 1], got device={on_device}, host={on_host}")
    _check(on_device + on_host <= 1 + 1e-9,
           f"{name} fractions on device ({on_device}) and host ({on_host}) add up to more than 1; "
           "the rest goes to disk")


@dataclass(frozen=True)
class Policy:
    """Where tensors live and how the block schedule runs (FlexGen's policy).

    A block of `gpu_batch_size * num_gpu_batches` sequences advances one token at a time; each
    layer's weights are loaded once per token and reused by every GPU batch. Fractions are of
    bytes; what is not on the device or the host is on disk. On a CPU-only machine the device
    and the host are the same memory. Activations always stay on the compute device: they are
    one block's hidden states, small next to weights and cache, so FlexGen's activation
    placement is not modelled (its two `--percent` numbers are checked and ignored).
    """

    gpu_batch_size: int = 8
    num_gpu_batches: int = 1
    weights_device: float = 1.0
    weights_host: float = 0.0
    cache_device: float = 1.0
    cache_host: float = 0.0
    overlap: bool = True
    cpu_attention: bool = False
    pin_weights: bool = True
    compress_weight: bool = False
    compress_cache: bool = False
    compress_bits: int = 4
    compress_group: int | None = None  # None: the source's quantization grid, else 64 (see group_size)
    cache_window: int = 32
    attn_sparsity: float = 1.0

    def __post_init__(self):
        _check(isinstance(self.gpu_batch_size, int) and self.gpu_batch_size >= 1,
               f"gpu_batch_size must be an integer >= 1, got {self.gpu_batch_size!r}")
        _check(isinstance(self.num_gpu_batches, int) and self.num_gpu_batches >= 1,
               f"num_gpu_batches must be an integer >= 1, got {self.num_gpu_batches!r}")
        _fraction_pair("weights", self.weights_device, self.weights_host)
        _fraction_pair("cache", self.cache_device, self.cache_host)
        _check(0 < self.attn_sparsity <= 1,
               f"attn_sparsity is the fraction of attention weights kept, in (0, 1]; got {self.attn_sparsity!r}")
        _check(isinstance(self.cache_window, int) and self.cache_window >= 0,
               f"cache_window must be an integer >= 0, got {self.cache_window!r}")
        _check(self.compress_bits in (4, 8), f"compress_bits must be 4 or 8, got {self.compress_bits!r}")
        _check(self.compress_group is None or (isinstance(self.compress_group, int) and self.compress_group >= 2
                                               and self.compress_group % 2 == 0),
               f"compress_group must be an even integer >= 2, got {self.compress_group!r}")

    @property
    def block_size(self) -> int:
        return self.gpu_batch_size * self.num_gpu_batches

    @property
    def group_size(self) -> int:
        """Values per quantization group. Left unset, the LLM sets it to the grid its source
        was quantized on (a GGUF Q4_1 file: 32), where re-quantizing loses nothing more;
        until then, and for a dense source, it is FlexGen's 64."""
        return self.compress_group or DEFAULT_COMPRESS_GROUP

    @property
    def weight_quant(self) -> "QuantConfig | None":
        """How layer weights are compressed (groups along input features), or None."""
        return QuantConfig(self.compress_bits, self.group_size, 1) if self.compress_weight else None

    @property
    def cache_quant(self) -> "QuantConfig | None":
        """How the KV cache is compressed (groups along the head dimension), or None."""
        return QuantConfig(self.compress_bits, self.group_size, -1) if self.compress_cache else None

    def all_in_memory(self, device_type: str) -> bool:
        """Dense weights and KV cache all where compute runs (on a CPU, RAM is device and
        host alike), with nothing this policy asks of the offloading runner."""
        if self.compress_weight or self.compress_cache or self.attn_sparsity < 1.0:
            return False
        if device_type == "cuda":
            return self.weights_device == 1.0 and self.cache_device == 1.0
        return self.weights_disk == 0.0 and self.cache_disk == 0.0

    @property
    def weights_disk(self) -> float:
        return max(0.0, 1.0 - self.weights_device - self.weights_host)

    @property
    def cache_disk(self) -> float:
        return max(0.0, 1.0 - self.cache_device - self.cache_host)

    @classmethod
    def from_percent(cls, percent: list[float], **kwargs) -> "Policy":
        """FlexGen's six numbers: weights GPU%, CPU%, cache GPU%, CPU%, activations GPU%, CPU%.

        The activation pair is validated like the others so FlexGen command lines carry over,
        then ignored: activations always stay on the compute device (see the class doc)."""
        _check(len(percent) == 6, "--percent takes six numbers (w_gpu w_cpu cache_gpu cache_cpu act_gpu act_cpu), "
                                  f"got {len(percent)}")
        _check(all(0 <= p <= 100 for p in percent), f"--percent values must be in [0, 100], got {percent}")
        f = [p / 100 for p in percent]
        _fraction_pair("activations", f[4], f[5])
        return cls(weights_device=f[0], weights_host=f[1], cache_device=f[2], cache_host=f[3], **kwargs)
