"""Structured output: with a response_format, every generated text parses as JSON and
validates against its schema (checked by `jsonschema`, an independent validator), greedy and
sampled, in memory and with weights and KV cache on disk. The model has random weights and the
default model's real tokenizer, so nothing but the grammar mask makes its output JSON."""
from __future__ import annotations

import json

import jsonschema
import pytest
import torch

from flexbatch import LLM, SamplingParams
from flexbatch.config import Policy
from flexbatch.errors import ConfigError

from structured_util import tiny_llama_with_tokenizer

pytest.importorskip("llguidance")

# Every string, array and number is bounded, so the grammar ends each text in a few dozen
# tokens and max_new_tokens (200) cannot cut one short.
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "role": {"enum": ["author", "editor", "reviewer"]},
        "age": {"type": "integer", "minimum": 18, "maximum": 99},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                                     "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["city", "zip"], "additionalProperties": False},
    },
    "required": ["name", "role", "age", "address"],
    "additionalProperties": False,
}
MEASUREMENTS = {
    "type": "object",
    "properties": {
        "values": {"type": "array", "items": {"type": "number", "minimum": -1.5, "maximum": 2.5},
                   "minItems": 1, "maxItems": 4},
        "unit": {"enum": ["m", "s", "kg"]},
        "valid": {"type": "boolean"},
    },
    "required": ["values", "unit", "valid"],
    "additionalProperties": False,
}
LABELS = {"type": "array", "items": {"enum": ["yes", "no", "maybe"]}, "minItems": 2, "maxItems": 3}
SCHEMAS = {"person": PERSON, "measurements": MEASUREMENTS, "labels": LABELS}
PROMPTS = ["Describe the author as JSON:", "Measure it.", "Answer:", "x", "The record reads"]


def response_format(name: str) -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": SCHEMAS[name], "strict": True}}


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory, default_model_store):
    return tiny_llama_with_tokenizer(tmp_path_factory.mktemp("structured"), default_model_store)


def requests(temperature: float) -> tuple[list[str], list[SamplingParams]]:
    prompts, params = [], []
    for i, name in enumerate(SCHEMAS):
        for j, prompt in enumerate(PROMPTS[:3]):
            prompts.append(prompt)
            params.append(SamplingParams(max_new_tokens=200, temperature=temperature, seed=10 * i + j,
                                         response_format=response_format(name)))
    return prompts, params


def assert_valid(outputs, params) -> None:
    for out, p in zip(outputs, params):
        schema = p.response_format.schema
        assert out.finish_reason == "stop", (out.text, out.finish_reason)
        jsonschema.validate(json.loads(out.text), schema)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_every_text_validates_in_memory(model_folder, temperature):
    prompts, params = requests(temperature)
    outputs = LLM(model_folder, dtype="float32", batch_size=4).generate(prompts, params)
    assert_valid(outputs, params)


DISK = Policy(gpu_batch_size=3, num_gpu_batches=2, weights_device=0, weights_host=0, cache_device=0, cache_host=0)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_every_text_validates_with_weights_and_cache_on_disk(model_folder, tmp_path, temperature):
    prompts, params = requests(temperature)
    with LLM(model_folder, dtype="float32", policy=DISK, offload_dir=tmp_path) as llm:
        outputs = llm.generate(prompts, params)
    assert_valid(outputs, params)
    # The mask acts on the model's logits whatever the placement: the same tokens as in memory.
    in_memory = LLM(model_folder, dtype="float32", batch_size=6).generate(prompts, params)
    assert [o.token_ids for o in outputs] == [o.token_ids for o in in_memory]


def test_unconstrained_neighbours_are_unchanged(model_folder):
    """A constrained request in the batch does not alter the others' tokens."""
    plain = SamplingParams(max_new_tokens=12, ignore_eos=True)
    llm = LLM(model_folder, dtype="float32", batch_size=4)
    alone = llm.generate(PROMPTS[:2], plain)
    mixed = llm.generate(PROMPTS[:3], [plain, plain, SamplingParams(max_new_tokens=50,
                                                                   response_format=response_format("labels"))])
    assert [o.token_ids for o in mixed[:2]] == [o.token_ids for o in alone]
    json.loads(mixed[2].text)


def test_json_object_gives_objects_with_the_default_model(default_model_store):
    """json_object bounds nothing (a random model may write one string forever), so it is
    checked with the real model, asked for an object."""
    params = [SamplingParams(max_new_tokens=80, temperature=t, seed=1, response_format={"type": "json_object"})
              for t in (0.0, 0.7)]
    ask = [{"role": "user", "content": "Give Ada Lovelace's name and birth year as JSON."}]
    outputs = LLM(default_model_store).chat([ask, ask], params)
    for out in outputs:
        assert out.finish_reason == "stop", out.text
        assert isinstance(json.loads(out.text), dict)


def test_length_cut_gives_length_and_an_unfinished_text(model_folder):
    """A text cut at max_new_tokens ends with finish_reason "length" and need not parse
    (as in OpenAI's API): the grammar constrains tokens, it does not shorten the object."""
    out = LLM(model_folder, dtype="float32").generate(
        ["Describe:"], SamplingParams(max_new_tokens=4, response_format=response_format("person")))[0]
    assert out.finish_reason == "length" and out.text.startswith('{"')
    with pytest.raises(json.JSONDecodeError):
        json.loads(out.text)


def test_response_format_checked_on_construction():
    with pytest.raises(ConfigError, match="frobnicate"):
        SamplingParams(response_format={"type": "json_schema",
                                        "json_schema": {"name": "x", "schema": {"type": "frobnicate"}}})
    with pytest.raises(ConfigError, match="json_schema"):
        SamplingParams(response_format={"type": "xml"})
    assert SamplingParams(response_format={"type": "text"}).response_format is None


def test_invalid_schema_gets_an_error_record_and_the_job_goes_on(model_folder, tmp_path):
    from flexbatch.jobs.runner import run_job

    good = {"custom_id": "good", "method": "POST", "url": "/v1/completions",
            "body": {"prompt": "Answer:", "max_tokens": 50, "response_format": response_format("labels")}}
    bad = {"custom_id": "bad", "method": "POST", "url": "/v1/completions",
           "body": {"prompt": "Answer:", "response_format": {"type": "json_schema", "json_schema": {
               "name": "bad", "schema": {"type": "object", "properties": {"a": {"type": "frobnicate"}}}}}}}
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join(json.dumps(r) for r in (good, bad)) + "\n")
    output = tmp_path / "out.jsonl"
    run_job(LLM(model_folder, dtype="float32"), source, output, progress=False)
    records = {r["custom_id"]: r for r in map(json.loads, output.read_text().splitlines())}
    assert "frobnicate" in records["bad"]["error"]["message"]
    text = records["good"]["response"]["body"]["choices"][0]["text"]
    jsonschema.validate(json.loads(text), LABELS)


def test_mask_bias_matches_numpy_unpackbits():
    """The gather-based unpacking against numpy's bit order (little-endian words, low bit first)."""
    import numpy as np

    from flexbatch.structured import mask_bias

    g = torch.Generator().manual_seed(0)
    bits = torch.randint(-2**31, 2**31 - 1, (3, 5), dtype=torch.int32, generator=g)
    expected = np.unpackbits(bits.numpy().view(np.uint8), axis=1, bitorder="little")[:, :150].astype(bool)
    bias = mask_bias(bits, 150)
    assert bias.shape == (3, 150)
    assert np.array_equal((bias == 0).numpy(), expected) and bool(torch.isinf(bias[~torch.from_numpy(expected)]).all())
