"""The lm-eval backend against lm-eval's own `hf` model on the same weights (fp32), on tasks
defined here (nothing downloaded): per-request log-likelihoods, accuracy, rolling
log-likelihoods across several windows, and generation equal to LLM.generate."""
from __future__ import annotations

import json
import os

import pytest

lm_eval = pytest.importorskip("lm_eval")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # a local task must not reach the hub
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from flexbatch import LLM, SamplingParams  # noqa: E402
from flexbatch.config import Policy  # noqa: E402
from flexbatch.integrations.lm_eval import FlexbatchLM  # noqa: E402

CONTEXT = 64  # the tiny model's window: the longer texts span several rolling windows

QUESTIONS = [
    ("The capital of France is", ["Paris", "London", "a small dog", "Berlin"], 0),
    ("Water freezes at a temperature of", ["zero degrees", "one hundred degrees", "minus forty"], 0),
    ("The opposite of hot is", ["cold", "warm", "loud", "blue"], 0),
    ("A group of lions is called a", ["pride", "flock", "school"], 0),
    ("The largest planet in our solar system is", ["Jupiter", "Mars", "the Moon", "Venus", "Earth"], 0),
    ("Question: what do bees make?\nAnswer:", ["honey", "milk", "silk thread from their legs"], 0),
    ("Two plus two equals", ["four", "five", "twenty-two"], 0),
    ("The sun rises in the", ["east", "west", "north", "south"], 0),
]
TEXTS = [
    "A short sentence.",
    "The quick brown fox jumps over the lazy dog. " * 12,
    "In the beginning there was a small village by the sea, where fishermen mended their nets "
    "every morning and told stories of storms long past. The children listened, and some of them "
    "grew up to sail the same waters, while others left for the cities beyond the hills.",
    "Numbers: " + ", ".join(str(i) for i in range(60)),
]


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory, default_model_store):
    """A tiny random Llama in fp32 with the default model's tokenizer, saved as an HF folder."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(default_model_store)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=CONTEXT,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0, 0.1) if "norm" in name else p.normal_(0, 0.2)
    folder = tmp_path_factory.mktemp("tiny_llama_tok")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tasks")
    mc = folder / "mc.jsonl"
    mc.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in QUESTIONS))
    texts = folder / "texts.jsonl"
    texts.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    (folder / "fb_mc.yaml").write_text(f"""task: fb_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {mc}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: choices
doc_to_target: answer
metric_list:
  - metric: acc
""")
    (folder / "fb_rolling.yaml").write_text(f"""task: fb_rolling
dataset_path: json
dataset_kwargs:
  data_files:
    test: {texts}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
""")
    return folder


def evaluate(model, task_dir) -> dict:
    # lm-eval's own task catalogue left out: indexing its thousands of YAML files takes seconds
    tasks = TaskManager(include_path=str(task_dir), include_defaults=False)
    return lm_eval.simple_evaluate(model=model, tasks=["fb_mc", "fb_rolling"], log_samples=True, task_manager=tasks)


def responses(results: dict, task: str) -> list:
    """Every request's response, in document order: (log-likelihood, is_greedy) or log-likelihood."""
    docs = sorted(results["samples"][task], key=lambda s: s["doc_id"])
    return [r[0] for s in docs for r in s["resps"]]


def per_request(results: dict, task: str) -> list[float]:
    return [float(r[0] if isinstance(r, (list, tuple)) else r) for r in responses(results, task)]


@pytest.fixture(scope="module")
def hf_results(model_folder, task_dir):
    from lm_eval.models.huggingface import HFLM

    return evaluate(HFLM(pretrained=str(model_folder), device="cpu", dtype="float32", batch_size=8), task_dir)


@pytest.fixture(scope="module")
def ours(model_folder):
    return FlexbatchLM(pretrained=str(model_folder), dtype="float32", batch_size=8)


def assert_same_numbers(got: dict, expected: dict) -> None:
    assert per_request(got, "fb_mc") == pytest.approx(per_request(expected, "fb_mc"), abs=1e-4)
    assert [bool(r[1]) for r in responses(got, "fb_mc")] == [bool(r[1]) for r in responses(expected, "fb_mc")]
    # a whole text's log-likelihood sums ~150 tokens' fp32 rounding: 1e-4, or 1e-6 of the total
    assert per_request(got, "fb_rolling") == pytest.approx(per_request(expected, "fb_rolling"), abs=1e-4, rel=1e-6)
    assert got["results"]["fb_mc"]["acc,none"] == expected["results"]["fb_mc"]["acc,none"]
    assert got["results"]["fb_rolling"]["word_perplexity,none"] == pytest.approx(
        expected["results"]["fb_rolling"]["word_perplexity,none"], rel=1e-4)


def test_scores_match_lm_evals_hf_model(ours, hf_results, task_dir):
    got = evaluate(ours, task_dir)
    assert len(per_request(got, "fb_mc")) == sum(len(c) for _, c, _ in QUESTIONS)
    assert_same_numbers(got, hf_results)


def test_weights_and_cache_on_disk_give_the_same_numbers(model_folder, hf_results, task_dir, tmp_path):
    policy = Policy(gpu_batch_size=3, num_gpu_batches=2, weights_device=0, weights_host=0, cache_device=0,
                    cache_host=0)
    with LLM(model_folder, dtype="float32", policy=policy, offload_dir=tmp_path) as llm:
        got = evaluate(FlexbatchLM(llm=llm), task_dir)
        assert llm.runner.home.tier_bytes()  # the weights really are placed (on disk)
    assert_same_numbers(got, hf_results)


def test_model_args_take_the_policy_flags(model_folder, tmp_path):
    lm = lm_eval.api.registry.get_model("flexbatch").create_from_arg_string(
        f"pretrained={model_folder},dtype=float32,percent=0 0 100 0 100 0,gpu_batch_size=2,"
        f"num_gpu_batches=2,offload_dir={tmp_path}")
    with lm.llm:
        assert (lm.llm.policy.weights_device, lm.llm.policy.weights_host, lm.llm.policy.block_size) == (0, 0, 4)
    with pytest.raises(Exception, match="unrecognized arguments: --gpu-batchsize"):
        FlexbatchLM(pretrained=str(model_folder), gpu_batchsize=2)


def test_is_greedy_matches_the_models_own_choice(ours):
    context = ours.tok_encode("The quick brown fox")
    greedy = ours.llm.generate_ids([context], SamplingParams(max_new_tokens=3, ignore_eos=True))[0].token_ids
    other = [(greedy[0] + 1) % ours.llm.config.vocab_size] + greedy[1:]
    got = ours._loglikelihood_tokens([(None, context, greedy), (None, context, other), (None, context, greedy[:1])])
    assert [g for _, g in got] == [True, False, True]


def test_generate_until_equals_llm_generate(ours):
    prompts = ["Once upon a time", "The answer is", "Hello"]
    settings = [{"until": ["."], "max_gen_toks": 12},
                {"until": [" the", "\n"], "max_gen_toks": 8, "do_sample": True, "temperature": 0.8, "seed": 3},
                {"max_gen_toks": 5}]
    requests = [Instance("generate_until", {}, (p, g), i) for i, (p, g) in enumerate(zip(prompts, settings))]
    got = ours.generate_until(requests)
    expected = [
        ours.llm.generate(prompts[0], SamplingParams(max_new_tokens=12, stop=["."]))[0].text,
        ours.llm.generate(prompts[1], SamplingParams(max_new_tokens=8, stop=[" the", "\n"], temperature=0.8,
                                                     seed=3))[0].text,
        ours.llm.generate(prompts[2], SamplingParams(max_new_tokens=5))[0].text,
    ]
    assert got == expected


def test_flexbatch_eval_command_writes_lm_evals_results(model_folder, task_dir, hf_results, tmp_path, capsys):
    from flexbatch.cli.main import main

    out = tmp_path / "results"
    code = main(["eval", "--tasks", "fb_mc", "--include-path", str(task_dir), "--model", str(model_folder),
                 "--dtype", "float32", "--output-path", str(out)])
    assert code == 0
    captured = capsys.readouterr()
    assert "fb_mc" in captured.out  # lm-eval's table
    assert "planner: block" in captured.err  # no policy given: planned for a scoring workload
    [written] = list(out.glob("flexbatch/results_*.json"))
    assert json.loads(written.read_text())["results"]["fb_mc"]["acc,none"] == hf_results["results"]["fb_mc"]["acc,none"]
