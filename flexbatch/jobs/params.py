"""Per-request sampling fields (OpenAI names) merged over the job-wide defaults."""
from __future__ import annotations

from dataclasses import replace
from typing import Any

from ..config import SamplingParams
from ..errors import ConfigError

IGNORED = {"model", "user", "metadata", "service_tier", "store"}
MUST_EQUAL = {"n": 1, "stream": False, "echo": False, "best_of": 1, "top_logprobs": 0,
              "presence_penalty": 0, "frequency_penalty": 0}


def request_params(fields: dict[str, Any], defaults: SamplingParams) -> SamplingParams:
    """SamplingParams for one request; raises ConfigError naming an unsupported field."""
    changes: dict[str, Any] = {}
    for name, value in fields.items():
        if name in IGNORED or value is None:
            continue
        if name in MUST_EQUAL:
            if value != MUST_EQUAL[name]:
                raise ConfigError(f"field {name}={value!r} is not supported (only {MUST_EQUAL[name]!r})")
        elif name in ("max_tokens", "max_completion_tokens", "max_new_tokens"):
            changes["max_new_tokens"] = _int(name, value)
        elif name in ("temperature", "top_p"):
            changes[name] = _number(name, value)
        elif name in ("top_k", "seed"):
            changes[name] = _int(name, value)
        elif name == "stop":
            changes["stop"] = _stop(value)
        elif name == "logprobs":
            changes["logprobs"] = bool(value)
        elif name == "ignore_eos":
            changes["ignore_eos"] = bool(value)
        else:
            raise ConfigError(f"field {name!r} is not supported by flexbatch")
    return replace(defaults, **changes) if changes else defaults


def _int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"field {name} must be an integer, got {value!r}")
    return value


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"field {name} must be a number, got {value!r}")
    return float(value)


def _stop(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ConfigError(f"field stop must be a string or a list of strings, got {value!r}")
