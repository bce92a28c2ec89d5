"""The public entry point: `LLM` loads a model and generates or scores batches of prompts.

    from flexbatch import LLM, SamplingParams
    llm = LLM()                                  # the default model (SmolLM2-135M-Instruct)
    outs = llm.generate(["The capital of France is"], SamplingParams(max_new_tokens=16))
    print(outs[0].text)
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from .config import Policy, SamplingParams, parse_dtype
from .default_model import default_model_path
from .devices import default_dtype, pick_device
from .engine.generation import Arrivals, BlockStats, Completion, Request, Vocabulary
from .engine.lanes import generate_in_lanes
from .engine.runner import InMemoryRunner
from .errors import ConfigError
from .kernels import KernelChoice
from .model_policy import decode_kernel, effective_policy, kernel_choice
from .models import get_family
from .progress import TokenProgress
from .weights import load_weights, open_model
from .weights.source import OpenedModel

Prompt = str | Sequence[int]
Message = dict  # {"role": ..., "content": ...}


@dataclass
class RequestOutput:
    """One request's result. `token_ids` include a final EOS/stop token if one ended it;
    `text` excludes special tokens and anything from a stop string on."""

    prompt: str | None
    prompt_token_ids: list[int]
    text: str | None
    token_ids: list[int]
    finish_reason: str
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None  # per token, with SamplingParams.top_logprobs


@dataclass
class ScoreOutput:
    """Scores of the scored tokens: of a text, tokens 1 .. n-1; of a continuation, all of it."""

    token_ids: list[int]
    logprobs: list[float]  # log p(token | tokens before it)
    greedy: list[bool]  # whether each token is the model's most likely one there
    # with score(top_logprobs=k): per scored token, the k most likely tokens there, (id, logprob) most likely first
    top_logprobs: list[list[tuple[int, float]]] | None = None

    @property
    def total(self) -> float:
        return float(sum(self.logprobs))

    @property
    def is_greedy(self) -> bool:
        """Greedy decoding would have produced exactly these tokens."""
        return all(self.greedy)


class LLM:
    """A model loaded for batch generation.

    model: a Hugging Face folder, a .gguf file, a folder written by `flexbatch convert`, a
    model already opened with `flexbatch.weights.open_model`, or None for the default model.
    dtype: "auto" (bf16 where the CPU or GPU runs it fast, else fp32), "float32", "bfloat16"
    or "float16". batch_size: sequences generated together.

    policy: where weights and KV cache live and how the block schedule runs (see `Policy`);
    None keeps everything in memory, dense. A policy that keeps everything dense where
    compute runs only sets the block (`policy.block_size` sequences in flight); any other,
    including one that only compresses, runs on the offloading runner: it alone keeps
    weights packed and the KV cache quantized. Layer weights stream from `offload_dir` (a
    temporary folder by default), and `cpu_memory` / `gpu_memory` (bytes; default: what is free) bound what
    the policy may use, checked before anything is allocated. Without a policy, a given
    `cpu_memory` is checked against the weights kept in memory. kernels: which kernel
    multiplies by 4-bit weights (`KernelChoice`); None takes FLEXBATCH_INT4_FUSED_MAX_ROWS
    if set, else this machine's hardware profile (measured once and cached).

    pipeline_stages: split the model's layers over that many processes started by torchrun
    (`torchrun --nproc-per-node N script.py`, N a multiple of the stages), each running its
    range of layers under `policy` within its own memory. Every process constructs the LLM
    and makes the same calls; the first stage (RANK % stages == 0) returns the outputs, the
    others serve their part and return empty lists. Each stage keeps `pipeline_stages`
    blocks in flight, so all of them compute at once. Scoring does not run on stages yet.
    """

    def __init__(self, model: str | Path | OpenedModel | None = None, dtype: str | torch.dtype = "auto",
                 device: str = "auto", batch_size: int = 32, policy: Policy | None = None,
                 offload_dir: str | Path | None = None, cpu_memory: int | None = None,
                 gpu_memory: int | None = None, kernels: KernelChoice | None = None, pipeline_stages: int = 1):
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        if not isinstance(model, OpenedModel):
            model = open_model(default_model_path() if model is None else model)
        opened = model
        self.model_path = opened.path
        self.config = opened.config
        self.family = get_family(self.config)
        self.device = pick_device(device)
        self.dtype = parse_dtype(dtype) or default_dtype(self.device)
        self.batch_size = batch_size
        self.tokenizer = opened.load_tokenizer()
        policy = self.policy = effective_policy(opened, policy, batch_size)
        self.pipeline = self.stage_server = None  # the roles of a process in pipeline stages
        if pipeline_stages > 1:
            policy = policy or Policy(gpu_batch_size=batch_size)
            self._start_stage(opened, policy, pipeline_stages, offload_dir, cpu_memory, gpu_memory, kernels)
            self.batch_size = policy.block_size
        else:
            self._build_runner(opened, policy, offload_dir, cpu_memory, gpu_memory, kernels)
        self.eos_ids = set(self.config.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            self.eos_ids.add(self.tokenizer.eos_token_id)
        self.pad_id = next((i for i in (self.config.pad_token_id, *sorted(self.eos_ids)) if i is not None), 0)

    @property
    def lanes(self) -> list:
        """The runners whose blocks are decoded at once: one, or a pipeline's lanes."""
        return self.pipeline.lanes if self.pipeline else [self.runner]

    def disk_use(self):
        """The offload disk's use so far (`storage.disk.DiskUse`: bytes moved, seconds busy),
        or None where nothing is offloaded (the in-memory runner)."""
        from .engine.offload_runner import OffloadRunner, disk_use

        offloaded = [r for r in self.lanes if isinstance(r, OffloadRunner)]
        return disk_use(offloaded) if offloaded else None

    def _build_runner(self, opened, policy: Policy | None, offload_dir, cpu_memory, gpu_memory, kernels) -> None:
        decode = decode_kernel()  # also switches the fused elementwise kernels on for every runner
        if policy is not None and policy.all_in_memory(self.device.type):
            self.batch_size = policy.block_size  # nothing to stream: the in-memory runner, faster
            policy = None
        if policy is None:  # dense and in memory; compression needs the offloading runner
            if cpu_memory is not None:
                self._check_in_memory_fit(cpu_memory, gpu_memory)
            weights = load_weights(self.config, self.family, opened.source, self.dtype, self.device)
            self.runner = InMemoryRunner(self.config, self.family, weights, self.dtype, self.device, decode)
        else:
            self.runner = self._offload_runner(opened, policy, offload_dir, cpu_memory, gpu_memory, kernels)
            self.batch_size = policy.block_size

    def _offload_runner(self, opened, policy: Policy, offload_dir, cpu_memory, gpu_memory, kernels,
                        layers: range | None = None, lanes: int = 1):
        from .engine.memory import detect_budget
        from .engine.offload_runner import OffloadRunner

        budget = detect_budget(self.device, gpu_memory, cpu_memory)
        if kernels is None:
            kernels = kernel_choice(policy, self.device, self.dtype, offload_dir)
        return OffloadRunner(self.config, self.family, opened.source, policy, self.dtype, self.device, offload_dir,
                             budget, kernels, layers, lanes, decode_kernel())

    def _start_stage(self, opened, policy: Policy, stages: int, offload_dir, cpu_memory, gpu_memory, kernels):
        """This process's stage of a pipeline over the ranks torchrun started: the first
        drives the others (engine/pipeline.py)."""
        from .engine.pipeline import Pipeline, StagePlace, StageServer, stage_layers
        from .ranks import Ranks

        ranks = Ranks.from_env()
        if ranks is None:
            raise ConfigError(f"pipeline_stages={stages} needs one process per stage: launch with torchrun "
                              f"--nproc-per-node {stages} (see the README, 'Many processes, many machines').")
        ranks.start()
        if self.device.type == "cuda" and self.device.index is None:  # each local rank its own GPU
            self.device = torch.device(ranks.device("auto"))
        place = StagePlace.of(ranks.rank, ranks.world, stages)
        layers = stage_layers(self.config.num_layers, stages, place.stage)
        if offload_dir is not None:  # the ranks of one machine may share the folder given
            offload_dir = Path(offload_dir) / f"rank{ranks.rank}"
        self.runner = self._offload_runner(opened, policy, offload_dir, cpu_memory, gpu_memory, kernels, layers,
                                           lanes=stages)
        if place.first:
            self.pipeline = Pipeline(place, self.runner)
            self.runner = self.pipeline.lanes[0]
        else:
            self.stage_server = StageServer(place, self.runner)

    def _check_in_memory_fit(self, cpu_memory: int, gpu_memory: int | None) -> None:
        from .engine.memory import detect_budget
        from .sizing import weight_memory

        budget = detect_budget(self.device, gpu_memory, cpu_memory)
        plan = weight_memory(self.config, self.family, Policy(gpu_batch_size=self.batch_size), self.dtype, self.device)
        plan.check(budget, self.device.type != "cuda",
                   "Let the planner choose a policy (drop --no-plan), give one (--percent, --policy), or raise "
                   "--cpu-memory.")

    def close(self) -> None:
        """Release offload files and I/O threads (also done at interpreter exit). A later
        pipeline stage first serves until the first stage closes."""
        (self.stage_server or self.runner).close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- inputs -------------------------------------------------------------------------
    def _require_tokenizer(self):
        if self.tokenizer is None:
            raise ConfigError(f"{self.model_path} has no tokenizer files; pass token ids instead of text.")
        return self.tokenizer

    def encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            tokenizer = self._require_tokenizer()
            # Text from a chat template already begins with BOS (Gemma, Llama 3); the
            # tokenizer adding its own would give two, a prompt the model never saw.
            bos = getattr(tokenizer, "bos_token", None)
            add_special = not (bos and prompt.startswith(bos))
            return list(tokenizer(prompt, add_special_tokens=add_special)["input_ids"])
        ids = [int(t) for t in prompt]
        outside = [t for t in ids if not 0 <= t < self.config.vocab_size]
        if outside:
            raise ConfigError(f"token id {outside[0]} is outside the model's vocabulary of {self.config.vocab_size}")
        return ids

    def apply_chat_template(self, messages: list[Message]) -> str:
        tok = self._require_tokenizer()
        if not getattr(tok, "chat_template", None):
            raise ConfigError(f"the tokenizer of {self.model_path} has no chat template; send plain prompts.")
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def check_length(self, num_prompt_tokens: int, params: SamplingParams) -> None:
        limit = self.config.max_position_embeddings
        if num_prompt_tokens + params.max_new_tokens > limit:
            raise ConfigError(
                f"prompt of {num_prompt_tokens} tokens + max_new_tokens {params.max_new_tokens} exceeds "
                f"the model's context of {limit} tokens; shorten the prompt or lower max_new_tokens."
            )
        if num_prompt_tokens == 0:
            raise ConfigError("empty prompt: a prompt needs at least one token.")
        if params.response_format is not None and self.tokenizer is None:
            raise ConfigError(f"response_format needs a tokenizer and {self.model_path} has none; "
                              "drop response_format.")

    # ---- generation ---------------------------------------------------------------------
    def generate(self, prompts: Prompt | Sequence[Prompt],
                 params: SamplingParams | Sequence[SamplingParams] | None = None,
                 progress: bool = False, **hf_kwargs) -> list[RequestOutput]:
        """Generate for each prompt (text or token ids). `params` is one for all or one each.

        Instead of `params`, Hugging Face / FlexGen style keywords also work:
        `llm.generate(prompts, do_sample=True, temperature=0.7, max_new_tokens=32, stop="\\n")`
        (see `SamplingParams.from_hf`).
        """
        if hf_kwargs:
            if params is not None:
                raise ConfigError("pass either params or generate() keywords such as max_new_tokens=, not both")
            params = SamplingParams.from_hf(**hf_kwargs)
        if hasattr(prompts, "tolist"):  # a tensor or array of token ids, as FlexGen's generate takes
            prompts = prompts.tolist()
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompt_ids = [self.encode(p) for p in prompts]
        texts = [p if isinstance(p, str) else None for p in prompts]
        return self.generate_ids(prompt_ids, params, progress=progress, prompt_texts=texts)

    def chat(self, conversations: list[Message] | Sequence[list[Message]],
             params: SamplingParams | Sequence[SamplingParams] | None = None,
             progress: bool = False) -> list[RequestOutput]:
        """Generate replies to conversations, formatted with the tokenizer's chat template."""
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
        return self.generate([self.apply_chat_template(c) for c in conversations], params, progress)

    def generate_ids(self, prompt_ids: list[list[int]], params=None, progress: bool = False,
                     prompt_texts: list[str | None] | None = None, on_finish=None,
                     stats: BlockStats | None = None, arrivals: Arrivals | None = None) -> list[RequestOutput]:
        """`generate` for prompts given as token ids. on_finish(i, output), if given, is called
        with each request's RequestOutput as soon as it is done (requests finish out of order);
        `stats`, if given, is added the run's padding and row occupancy. `arrivals`: requests
        that join the running block as rows free up (a server's; engine.generation.Arrivals),
        numbered after these, their outputs last."""
        if self.stage_server is not None:  # a later pipeline stage: serves the first stage's matching call
            self.stage_server.serve(until_done=True)
            return []
        try:
            return self._generate_ids(prompt_ids, params, progress, prompt_texts, on_finish, stats, arrivals)
        finally:
            if self.pipeline is not None:
                self.pipeline.end_call()

    def _generate_ids(self, prompt_ids, params, progress, prompt_texts, on_finish, stats,
                      arrivals) -> list[RequestOutput]:
        params_list = _broadcast_params(params, len(prompt_ids))
        requests = [Request(ids, p) for ids, p in zip(prompt_ids, params_list)]
        for r in requests:
            self.check_length(len(r.token_ids), r.params)
        texts = prompt_texts or [None] * len(requests)
        # `requests` grows by the arrivals that join (engine.generation.Block.join); they have no text
        output = lambda i, c: RequestOutput(texts[i] if i < len(texts) else None, requests[i].token_ids, c.text,
                                            c.token_ids, c.finish_reason, c.logprobs, c.top_logprobs)
        bar = TokenProgress(total=len(requests), enabled=progress)

        def finished(i: int, completion: Completion) -> None:
            bar.add_requests(1)
            if on_finish is not None:
                on_finish(i, output(i, completion))

        vocab = Vocabulary(self.tokenizer, self.eos_ids, self.pad_id, self.config.vocab_size)
        try:
            completions = generate_in_lanes(self.lanes, requests, self.batch_size, vocab, bar.add_tokens, finished,
                                            stats, arrivals)
        finally:
            bar.close()
        return [output(i, c) for i, c in enumerate(completions)]

    # ---- scoring ------------------------------------------------------------------------
    def score(self, texts: Sequence[Prompt], piece: int | None = None, top_logprobs: int = 0) -> list[ScoreOutput]:
        """Per-token log-probabilities of each text (or token id list) under the model, and
        with `top_logprobs` the most likely tokens at each scored position (an echoed
        prompt's alternatives, as the OpenAI completions API gives them).

        `piece` runs the forward pass that many tokens at a time (default: whole texts); with
        a compressed KV cache, piece=1 scores each token as generation would see it.
        """
        from .engine.generation import left_pad

        ids = [self.encode(t) for t in texts]
        outputs = []
        for s in range(0, len(ids), self.batch_size):
            chunk = ids[s:s + self.batch_size]
            width = max(map(len, chunk))
            padded, key_valid = left_pad(chunk, width, self.pad_id)
            self.runner.begin(len(chunk), width)
            try:
                scores = self.runner.score(padded, key_valid, piece, top_logprobs)
            finally:
                self.runner.end()
            for b, token_ids in enumerate(chunk):
                kept = slice(width - len(token_ids), None)
                tops = None if not top_logprobs else [list(zip(ids, values)) for ids, values in zip(
                    scores.top_ids[b, kept].tolist(), scores.top_logprobs[b, kept].tolist())]
                outputs.append(ScoreOutput(token_ids, scores.logprobs[b, kept].tolist(),
                                           scores.greedy[b, kept].tolist(), tops))
        return outputs

    def score_continuations(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
                            progress: bool = False) -> list[ScoreOutput]:
        """Scores of each continuation's tokens given its context, for (context ids,
        continuation ids) pairs: lm-eval's loglikelihood, multiple-choice answers.

        A prefill pass and no KV cache: pairs that share a context run the context once, as
        one group, and groups fill rows of about a thousand tokens (engine/scoring.py); rows
        longest first, `batch_size` rows a block (fewer where wide rows would not fit the
        memory budget), and every layer's weights are read once per block.
        """
        from .engine.scoring import score_pairs

        encoded = [(self.encode(context), self.encode(continuation)) for context, continuation in pairs]
        for context, continuation in encoded:
            self._check_scored_length(len(context), len(continuation))
        group = self.family.length_group
        scored = score_pairs(self.runner, encoded, self.pad_id, self.batch_size,
                             group and (lambda n: group(self.config, n)), progress)
        return [ScoreOutput(continuation, logprobs, greedy)
                for (_, continuation), (logprobs, greedy) in zip(encoded, scored)]

    def _check_scored_length(self, context: int, continuation: int) -> None:
        limit = self.config.max_position_embeddings
        if context == 0 or continuation == 0:
            raise ConfigError("a scored pair needs a context and a continuation of at least one token each "
                              "(for text scored from its start, use a BOS or EOS token as the context).")
        if context + continuation - 1 > limit:
            raise ConfigError(f"context of {context} tokens + continuation of {continuation} exceeds the model's "
                              f"context of {limit} tokens; cut the context from the left.")


def _broadcast_params(params, n: int) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams()] * n
    if isinstance(params, SamplingParams):
        return [params] * n
    params = list(params)
    if len(params) != n:
        raise ConfigError(f"got {len(params)} SamplingParams for {n} prompts; pass one, or one per prompt.")
    return params
