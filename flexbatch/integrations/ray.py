"""Ray Data: generate over a dataset on every node of a Ray cluster, one flexbatch LLM per actor.

    import ray
    from flexbatch.integrations.ray import FlexbatchGenerator

    ds = ray.data.read_json("s3://bucket/prompts/")          # rows: prompt or messages, sampling fields
    out = ds.map_batches(FlexbatchGenerator, fn_constructor_kwargs={"model": "/models/opt-1.3b",
                         "max_new_tokens": 64}, compute=ray.data.ActorPoolStrategy(size=4), batch_size=64)
    out.write_parquet("s3://bucket/results/")

Rows are read like the lines of a plain JSONL job input: `prompt` (text or token ids) or
OpenAI chat `messages`, plus any of the OpenAI sampling fields (`max_tokens`, `temperature`,
`top_p`, `top_k`, `seed`, `stop`, ...); a missing (null) field takes the generator's
default. Every input column is passed through, and each row gains `text`, `finish_reason`,
`prompt_tokens`, `completion_tokens` and `error`: a row that is not a valid request gets its
message there (and empty text) instead of failing the whole dataset, as in `flexbatch run`.

Each actor loads the model once (the class's constructor) and generates each batch in
blocks of similar prompt lengths, with the offloading policy, memory budget and block size
given to it, like the `LLM` it wraps. Ray itself is not imported here: install it with
`pip install flexbatch[ray]`.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..api import LLM
from ..config import SamplingParams
from ..errors import ConfigError
from ..jobs.inputs import request_from_record
from ..jobs.params import FIELDS
from ..jobs.runner import Prepared, generate_isolated, make_segments, prepare_or_error

SAMPLING_KEYS = {"max_new_tokens", "temperature", "top_k", "top_p", "seed", "stop", "ignore_eos"}


class FlexbatchGenerator:
    """A callable class for `ray.data.Dataset.map_batches` (numpy batches, the default format).

    model: as for `LLM` (None: the default model). chat: send plain `prompt` rows through the
    chat template as a user message. Sampling defaults for rows that do not set a field:
    `max_new_tokens`, `temperature`, `top_k`, `top_p`, `seed`, `stop`, `ignore_eos`; every
    other keyword goes to `LLM` (dtype, device, batch_size, policy, offload_dir, cpu_memory...).
    """

    def __init__(self, model=None, chat: bool = False, **kwargs):
        sampling = {k: kwargs.pop(k) for k in list(kwargs) if k in SAMPLING_KEYS}
        if isinstance(sampling.get("stop"), str):
            sampling["stop"] = (sampling["stop"],)
        self.defaults = SamplingParams(**sampling)
        self.chat = chat
        self.llm = LLM(model, **kwargs)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if "prompt" not in batch and "messages" not in batch:
            raise ConfigError(f"the dataset has no `prompt` or `messages` column (columns: {sorted(batch)}); "
                              "rename the column holding the prompts, e.g. ds.rename_columns({'text': 'prompt'}).")
        rows = _rows(batch)
        results: list[Any] = [None] * len(rows)
        prepared = []
        for i, row in enumerate(rows):
            request = request_from_record(_request_fields(row), f"row-{i}")
            item = prepare_or_error(self.llm, request, self.defaults, self.chat)
            if isinstance(item, Prepared):
                item.request.line = i  # where its result goes
                prepared.append(item)
            else:
                results[i] = item
        for segment in make_segments(prepared, self.llm.batch_size):
            for p, out in zip(segment, generate_isolated(self.llm, segment)):
                results[p.request.line] = out
        return {**batch, **_columns(results)}


def _request_fields(row: dict) -> dict:
    """The row's prompt or messages and sampling fields; null (missing) values left out."""
    return {k: v for k, v in row.items() if k in ("prompt", "messages", *FIELDS) and not _missing(v)}


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _rows(batch: dict[str, np.ndarray]) -> list[dict]:
    """Plain Python rows: Ray hands nested values (token id lists, messages) as numpy arrays."""
    columns = {name: [_plain(v) for v in values] for name, values in batch.items()}
    count = len(next(iter(columns.values()), []))
    return [{name: values[i] for name, values in columns.items()} for i in range(count)]


def _plain(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _columns(results: list) -> dict[str, np.ndarray]:
    """The output columns; a result is a RequestOutput or the message of the row's error."""
    ok = [not isinstance(r, str) for r in results]
    return {
        "text": np.array([r.text if good else "" for r, good in zip(results, ok)], dtype=object),
        "finish_reason": np.array([r.finish_reason if good else "error" for r, good in zip(results, ok)],
                                  dtype=object),
        "prompt_tokens": np.array([len(r.prompt_token_ids) if good else 0 for r, good in zip(results, ok)]),
        "completion_tokens": np.array([len(r.token_ids) if good else 0 for r, good in zip(results, ok)]),
        "error": np.array([None if good else r for r, good in zip(results, ok)], dtype=object),
    }
