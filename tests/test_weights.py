"""Weight loading: the converted store, .bin checkpoints, and clear errors for bad inputs."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from flexbatch import LLM, SamplingParams
from flexbatch.errors import ModelFormatError, WeightFileError
from flexbatch.weights.source import open_model
from flexbatch.weights.store import STORE_INDEX, write_store

PROMPT = [4, 8, 15, 16, 23, 42]
PARAMS = SamplingParams(max_new_tokens=8, ignore_eos=True)


def tokens(path, **kw):
    return LLM(path, dtype="float32", **kw).generate([PROMPT], PARAMS)[0].token_ids


@pytest.fixture
def store(tiny_model, tmp_path):
    folder, _ = tiny_model("opt_post_ln_proj")
    return write_store(open_model(folder), tmp_path / "store")


def test_store_holds_every_tensor_with_its_index(tiny_model, store):
    folder, hf = tiny_model("opt_post_ln_proj")
    index = json.loads((store / STORE_INDEX).read_text())["tensors"]
    state = hf.state_dict()
    source = open_model(store).source
    for name, entry in index.items():
        assert (store / entry["file"]).stat().st_size == entry["nbytes"]
        torch.testing.assert_close(source.read(name), state[name], rtol=0, atol=0)
    assert tokens(store) == tokens(folder)


def test_store_cast_to_bfloat16(tiny_model, tmp_path):
    folder, _ = tiny_model("qwen2")
    dst = write_store(open_model(folder), tmp_path / "bf16", dtype=torch.bfloat16)
    index = json.loads((dst / STORE_INDEX).read_text())["tensors"]
    assert {e["dtype"] for e in index.values()} == {"bfloat16"}
    assert open_model(dst).source.read("model.norm.weight").dtype == torch.bfloat16


def test_corrupted_tensor_file_is_detected(store):
    index = json.loads((store / STORE_INDEX).read_text())["tensors"]
    path = store / index["model.decoder.layers.1.fc1.weight"]["file"]
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(WeightFileError, match="checksum mismatch.*fc1"):
        LLM(store, dtype="float32")


def test_truncated_tensor_file_is_detected(store):
    index = json.loads((store / STORE_INDEX).read_text())["tensors"]
    path = store / index["model.decoder.embed_tokens.weight"]["file"]
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(WeightFileError, match="truncated"):
        LLM(store, dtype="float32")


def test_folder_without_config_json(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelFormatError, match="no config.json"):
        LLM(tmp_path)


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bloom", "architectures": ["BloomForCausalLM"]}))
    with pytest.raises(ModelFormatError, match="unsupported architecture model_type='bloom'.*Supported"):
        LLM(tmp_path)


def test_missing_and_misshapen_tensors_are_listed(tiny_model, tmp_path):
    folder, _ = tiny_model("qwen2")
    copy = tmp_path / "m"
    shutil.copytree(folder, copy)
    config = json.loads((copy / "config.json").read_text())
    config["intermediate_size"] = 100
    config["num_hidden_layers"] += 1
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightFileError) as err:
        LLM(copy)
    message = str(err.value)
    assert "missing: model.layers.3." in message and "shape mismatches" in message and "(100, 64)" in message


def test_truncated_safetensors(tiny_model, tmp_path):
    folder, _ = tiny_model("qwen2")
    copy = tmp_path / "m"
    shutil.copytree(folder, copy)
    weights = copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(WeightFileError, match="model.safetensors"):
        LLM(copy)


def test_bin_checkpoint_loads_with_weights_only(tiny_model, tmp_path):
    folder, hf = tiny_model("opt_pre_ln")
    copy = tmp_path / "bin"
    copy.mkdir()
    shutil.copy(folder / "config.json", copy)
    # Original OPT checkpoints name tensors without the `model.` prefix.
    state = {k.removeprefix("model."): v for k, v in hf.state_dict().items()}
    torch.save(state, copy / "pytorch_model.bin")
    assert tokens(copy) == tokens(folder)


def test_bin_checkpoint_with_code_is_refused(tiny_model, tmp_path):
    folder, _ = tiny_model("opt_pre_ln")
    copy = tmp_path / "evil"
    copy.mkdir()
    shutil.copy(folder / "config.json", copy)
    torch.save({"x": torch.zeros(1), "payload": shutil.rmtree}, copy / "pytorch_model.bin")
    with pytest.raises(WeightFileError, match="weights_only=True"):
        LLM(copy)
