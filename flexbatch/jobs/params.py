"""Per-request sampling fields (OpenAI names) merged over the job-wide defaults.

Every field is checked for its type and range here, so a bad value becomes that request's
error record instead of an exception deep in the engine.
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

from ..config import MAX_TOP_LOGPROBS, SamplingParams
from ..errors import ConfigError
from ..structured import ResponseFormat
from .validate import short_json

IGNORED = {"model", "user", "metadata", "service_tier", "store", "stream_options"}
MUST_EQUAL = {"n": 1, "stream": False, "echo": False, "best_of": 1, "presence_penalty": 0, "frequency_penalty": 0}
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch's generators take
MAX_STOP_STRINGS = 16
# Every field a request may carry besides its prompt (the checks below give each its meaning).
FIELDS = (*IGNORED, *MUST_EQUAL, "max_tokens", "max_completion_tokens", "max_new_tokens", "temperature", "top_p",
          "top_k", "seed", "stop", "logprobs", "top_logprobs", "ignore_eos")


def request_params(fields: dict[str, Any], defaults: SamplingParams) -> SamplingParams:
    """SamplingParams for one request; raises ConfigError naming an unsupported field."""
    changes: dict[str, Any] = {}
    for name, value in fields.items():
        if name in IGNORED or value is None:
            continue
        if name in MUST_EQUAL:
            expected = MUST_EQUAL[name]
            if value != expected or isinstance(value, bool) != isinstance(expected, bool):
                raise ConfigError(f"field {name}={short_json(value)} is not supported (only {expected!r})")
        elif name in ("max_tokens", "max_completion_tokens", "max_new_tokens"):
            changes["max_new_tokens"] = _int(name, value, 1, 2**31)
        elif name == "temperature":
            changes[name] = _number(name, value, 0.0, 2.0)
        elif name == "top_p":
            changes[name] = _number(name, value, 0.0, 1.0, open_low=True)
        elif name == "top_k":
            changes[name] = _int(name, value, 0, 2**31)
        elif name == "seed":
            changes[name] = _int(name, value, *SEED_RANGE)
        elif name == "stop":
            changes["stop"] = _stop(value)
        elif name == "response_format":
            changes[name] = ResponseFormat.parse(value)  # checks the schema: a bad one fails this request alone
        elif name == "logprobs":
            changes.update(_logprobs(value))
        elif name == "top_logprobs":
            changes[name] = _int(name, value, 0, MAX_TOP_LOGPROBS)
        elif name == "ignore_eos":
            changes[name] = _flag(name, value)
        else:
            raise ConfigError(f"field {name!r} is not supported by flexbatch")
    _pair_logprobs(changes, defaults)
    return replace(defaults, **changes) if changes else defaults


def _pair_logprobs(changes: dict[str, Any], defaults: SamplingParams) -> None:
    """top_logprobs needs logprobs (as OpenAI's chat API says); logprobs=false turns off a
    job-wide --top-logprobs too."""
    if changes.get("top_logprobs") and not changes.get("logprobs", defaults.logprobs):
        raise ConfigError("field top_logprobs needs logprobs=true")
    if changes.get("logprobs") is False:
        changes["top_logprobs"] = 0


def most_new_tokens(requests, defaults: SamplingParams) -> int:
    """The most tokens any of `requests` (JobRequests) may generate: its own max_tokens, else
    the job's default (also the answer if there are no requests); a request whose fields are
    invalid (it will get an error record) does not count."""
    asked = []
    for request in requests:
        try:
            asked.append(request_params(request.fields, defaults).max_new_tokens)
        except ConfigError:
            continue
    return max(asked, default=defaults.max_new_tokens)


def _int(name: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"field {name} must be an integer, got {short_json(value)}")
    if not low <= value <= high:
        raise ConfigError(f"field {name} must be in [{low}, {high}], got {value}")
    return value


def _number(name: str, value: Any, low: float, high: float, open_low: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"field {name} must be a finite number, got {short_json(value)}")
    if value > high or value < low or (open_low and value == low):
        bracket = "(" if open_low else "["
        raise ConfigError(f"field {name} must be in {bracket}{low:g}, {high:g}], got {value}")
    return float(value)


def _flag(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    raise ConfigError(f"field {name} must be true or false, got {short_json(value)}")


def _logprobs(value: Any) -> dict[str, Any]:
    """Chat's true/false, or the completions API's count of alternatives per token (0: the
    chosen token's logprob alone), which sets top_logprobs too."""
    if isinstance(value, bool):
        return {"logprobs": value}
    if isinstance(value, int) and 0 <= value <= MAX_TOP_LOGPROBS:
        return {"logprobs": True, "top_logprobs": value}
    raise ConfigError(f"field logprobs must be true or false, or (completions) an integer in "
                      f"[0, {MAX_TOP_LOGPROBS}], got {short_json(value)}")


def _stop(value: Any) -> tuple[str, ...]:
    stops = (value,) if isinstance(value, str) else value
    if (not isinstance(stops, (list, tuple)) or len(stops) > MAX_STOP_STRINGS
            or not all(isinstance(s, str) and s for s in stops)):
        raise ConfigError(f"field stop must be a non-empty string or a list of up to {MAX_STOP_STRINGS} "
                          f"non-empty strings, got {short_json(value)}")
    return tuple(stops)
