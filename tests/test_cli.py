"""The command line, run as a user would, in subprocesses."""
from __future__ import annotations

import json
import subprocess
import sys

from flexbatch import LLM, SamplingParams


def flexbatch(*args, **kw):
    return subprocess.run([sys.executable, "-m", "flexbatch", *args], capture_output=True, text=True, **kw)


def test_help_lists_commands():
    out = flexbatch("--help")
    assert out.returncode == 0 and "generate" in out.stdout and "convert" in out.stdout
    assert flexbatch("generate", "--help").returncode == 0


def test_generate_json_matches_api(default_model_store, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The capital of France is\nWater boils at\n")
    out = flexbatch("generate", "--model", str(default_model_store), "--prompts-file", str(prompts),
                    "--max-new-tokens", "8", "--dtype", "float32", "--json")
    assert out.returncode == 0, out.stderr
    records = [json.loads(line) for line in out.stdout.splitlines()]
    expected = LLM(default_model_store, dtype="float32").generate(
        ["The capital of France is", "Water boils at"], SamplingParams(max_new_tokens=8))
    assert [r["token_ids"] for r in records] == [e.token_ids for e in expected]
    assert "tokens/s" in out.stderr


def test_convert_then_generate(tiny_model, tmp_path):
    folder, _ = tiny_model("llama_mha_bias")
    dst = tmp_path / "converted"
    out = flexbatch("convert", str(folder), str(dst))
    assert out.returncode == 0, out.stderr
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    assert (LLM(dst, dtype="float32").generate([[1, 2, 3]], params)[0].token_ids
            == LLM(folder, dtype="float32").generate([[1, 2, 3]], params)[0].token_ids)
    again = flexbatch("convert", str(folder), str(dst))
    assert again.returncode == 2 and "already exists" in again.stderr


def test_bad_model_path_is_a_clear_error():
    out = flexbatch("generate", "--model", "/no/such/model", "--prompt", "hi")
    assert out.returncode == 2 and "does not exist" in out.stderr and "Traceback" not in out.stderr


def test_generate_with_percent_policy_matches_in_memory(default_model_store, tmp_path):
    base = ["generate", "--model", str(default_model_store), "-p", "The capital of France is", "-p", "Hi",
            "--max-new-tokens", "6", "--dtype", "float32", "--json"]
    plain = flexbatch(*base)
    offloaded = flexbatch(*base, "--percent", "0", "0", "0", "0", "100", "0", "--gpu-batch-size", "1",
                          "--num-gpu-batches", "2", "--offload-dir", str(tmp_path / "off"))
    assert plain.returncode == 0 and offloaded.returncode == 0, offloaded.stderr
    assert plain.stdout == offloaded.stdout
    assert "policy: Policy(gpu_batch_size=1, num_gpu_batches=2" in offloaded.stderr


def test_policy_that_does_not_fit_is_a_clear_cli_error(default_model_store):
    # 800 MB: more than the process holds before loading (0.2-0.5 GiB, by how the machine maps
    # its libraries), less than that plus the 0.5 GiB of fp32 weights the policy keeps in memory
    out = flexbatch("generate", "--model", str(default_model_store), "-p", "x", "--dtype", "float32", "--percent",
                    "100", "0", "100", "0", "100", "0", "--cpu-memory", "800MB")
    assert out.returncode == 2 and "but the budget is" in out.stderr and "Traceback" not in out.stderr


def test_policy_flags_reach_the_policy():
    import argparse

    from flexbatch.cli.common import add_policy_args, build_policy

    parser = argparse.ArgumentParser()
    add_policy_args(parser)
    args = parser.parse_args(["--percent", "0", "50", "20", "30", "100", "0", "--cpu-attention", "--no-overlap"])
    policy = build_policy(args)
    assert policy.cpu_attention and not policy.overlap
    assert (policy.weights_host, policy.cache_device, policy.cache_host) == (0.5, 0.2, 0.3)


def test_offload_dir_alone_leaves_the_choice_to_the_planner(default_model_store, tmp_path):
    """--offload-dir says where offloaded data may go; the planner still picks the policy
    (for that folder's disk) and says why it left the KV cache uncompressed."""
    src = tmp_path / "prompts.txt"
    src.write_text("The capital of France is\nWater boils at\n")
    out = flexbatch("run", str(src), "-o", str(tmp_path / "out.jsonl"), "--model", str(default_model_store),
                    "--max-new-tokens", "2", "--offload-dir", str(tmp_path / "off"))
    assert out.returncode == 0, out.stderr
    assert "planner: block" in out.stderr and "planner: KV cache compression: off, not asked" in out.stderr


def test_compress_cache_if_faster_needs_the_planner(default_model_store, tmp_path):
    src = tmp_path / "prompts.txt"
    src.write_text("Hi\n")
    base = ["run", str(src), "-o", str(tmp_path / "out.jsonl"), "--model", str(default_model_store)]
    for extra in (["--percent", "100", "0", "100", "0", "100", "0"], ["--no-plan"], ["--compress-cache"]):
        out = flexbatch(*base, "--compress-cache-if-faster", *extra)
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
        assert "--compress-cache" in out.stderr.splitlines()[-1]
