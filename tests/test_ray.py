"""The Ray Data adapter in a real local Ray cluster: a 20-row dataset (plus one invalid row)
through `map_batches(FlexbatchGenerator, ...)` against `LLM.generate` / `LLM.chat` on the
same prompts."""
from __future__ import annotations

import numpy as np
import pytest

from flexbatch import LLM, SamplingParams

from shard_util import one_thread

ray = pytest.importorskip("ray")

PROMPTS = [f"Write one short sentence about the number {i}." for i in range(16)]
CONVERSATIONS = [[{"role": "user", "content": f"Name a colour that starts with the letter {c}."}] for c in "BGRY"]
MAX_NEW_TOKENS = 8


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, object_store_memory=200 * 1024**2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_twenty_rows_through_map_batches_equal_llm_generate(cluster, default_model_store):
    from flexbatch.integrations.ray import FlexbatchGenerator

    rows = [{"prompt": p, "messages": None, "temperature": None} for p in PROMPTS]
    rows += [{"prompt": None, "messages": m, "temperature": 0.0} for m in CONVERSATIONS]
    rows += [{"prompt": "Water boils at", "messages": None, "temperature": 7.0}]  # not a valid request
    ds = ray.data.from_items(rows, override_num_blocks=2)
    out = ds.map_batches(FlexbatchGenerator, batch_size=11, compute=ray.data.ActorPoolStrategy(size=2),
                         fn_constructor_kwargs={"model": str(default_model_store), "dtype": "float32",
                                                "batch_size": 4, "max_new_tokens": MAX_NEW_TOKENS})
    results = {(r["prompt"] or r["messages"][0]["content"]): r for r in out.take_all()}
    assert len(results) == 21

    with one_thread():
        llm = LLM(default_model_store, dtype="float32", batch_size=4)
        params = SamplingParams(max_new_tokens=MAX_NEW_TOKENS)
        expected = dict(zip(PROMPTS, llm.generate(PROMPTS, params)))
        expected.update(zip([c[0]["content"] for c in CONVERSATIONS], llm.chat(CONVERSATIONS, params)))
    for key, want in expected.items():
        got = results[key]
        assert (got["text"], got["finish_reason"]) == (want.text, want.finish_reason), key
        assert (got["prompt_tokens"], got["completion_tokens"]) == (len(want.prompt_token_ids), len(want.token_ids))
        assert got["error"] is None

    bad = results["Water boils at"]  # its own error, and the dataset went on
    assert "field temperature must be in [0, 2], got 7.0" in bad["error"]
    assert (bad["text"], bad["finish_reason"], bad["completion_tokens"]) == ("", "error", 0)


def test_a_dataset_without_prompts_is_refused_with_the_fix(default_model_store):
    from flexbatch.errors import ConfigError
    from flexbatch.integrations.ray import FlexbatchGenerator

    with one_thread():
        generator = FlexbatchGenerator(str(default_model_store), dtype="float32")
        with pytest.raises(ConfigError, match="no `prompt` or `messages` column.*rename_columns"):
            generator({"text": np.array(["hello"], dtype=object)})
