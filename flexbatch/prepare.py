"""Preparing a run: open the model once, choose its policy, then build the LLM.

Every command that runs a model (`run`, `generate`, `serve`, `eval-ppl`) and every
integration goes through here, so they open the model, estimate the workload, plan and
load alike. The order a policy is chosen in:

1. the policy the user gave (flags or a policy file); a block size that conflicts with it
   is refused;
2. else the policy an earlier run of the same job recorded, so a resume forms the same
   blocks (unless the user asks for another block size);
3. else, without planning, everything in memory in blocks of `batch_size` (default 32);
4. else the planner's choice for the workload, on this machine's hardware profile.

Over pipeline stages (`pipeline_stages` > 1) the first stage chooses so for its own layers
and sends the policy to the others (`share_with_stages`), which place their own layers
with the same block (`prepare_stage`).
"""
from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable, NamedTuple

import torch

from .api import LLM
from .config import Policy, parse_dtype
from .default_model import cache_dir, default_model_path
from .devices import default_dtype, pick_device
from .errors import ConfigError
from .model_policy import effective_policy
from .models import get_family
from .planner import Candidate, Plan, Workload, plan_policy
from .weights.loader import layer_weight_grid
from .weights.source import OpenedModel, open_model

DEFAULT_BATCH_SIZE = 32  # sequences per block without a policy or the planner
PROMPT_SAMPLE = 512  # prompts tokenized to estimate a workload's prompt length
MIN_PROMPT_TOKENS = 64  # the shortest prompt length the planner plans for
MAX_SCORING_BLOCK = 256  # rows a planned scoring block holds at most (each reads every layer's weights once)

log_to_stderr = lambda msg: print(msg, file=sys.stderr)


@dataclass(frozen=True)
class RunSettings:
    """What the user asked for. `policy`: one they gave, else None; `plan`: whether the
    planner chooses when they gave none; `compression`: Policy's compress_* fields the
    planner plans with (a compressed-weight group size left None follows the model's grid)."""

    model: str | Path | OpenedModel | None = None
    dtype: str = "auto"
    device: str = "auto"
    batch_size: int | None = None
    policy: Policy | None = None
    plan: bool = True
    compression: dict = field(default_factory=dict)
    offload_dir: str | Path | None = None
    cpu_memory: int | None = None
    gpu_memory: int | None = None
    pipeline_stages: int = 1

    def __post_init__(self):
        if self.batch_size is not None and self.batch_size < 1:
            raise ConfigError(f"the batch size must be >= 1, got {self.batch_size}")
        if self.policy is not None and self.batch_size not in (None, self.policy.block_size):
            p = self.policy
            raise ConfigError(f"--batch-size {self.batch_size} conflicts with the policy's block of "
                              f"{p.gpu_batch_size} x {p.num_gpu_batches} = {p.block_size} sequences; drop one of them.")


class WorkloadEstimate(NamedTuple):
    """What a command tells the planner of its work: the longest prompt in tokens, how many
    sequences there are, and the most tokens one of them may generate (None: the run's
    default; a job's requests may ask for more or fewer, and their KV cache must fit the
    plan)."""

    prompt_len: int
    num_sequences: int
    gen_len: int | None = None
    shared_prefix: int = 0  # leading tokens every prompt shares (`prompt_shape`)
    grouped_prompt_len: float | None = None  # see planner.Workload; None: the longest


class PromptShape(NamedTuple):
    """What the planner is told of a job's prompts (`prompt_shape`)."""

    longest: int
    shared_prefix: int
    grouped: float  # tokens per prompt the in-memory runner computes (planner.Workload.grouped_prompt_len)


@dataclass
class PreparedRun:
    """A model opened once and the policy and block size it will run with."""

    settings: RunSettings
    opened: OpenedModel
    device: torch.device
    dtype: torch.dtype
    policy: Policy | None  # None: everything in memory, dense
    batch_size: int  # sequences per block
    work: Workload | None = None  # what the planner planned for, if it ran

    def build_llm(self) -> LLM:
        s = self.settings
        return LLM(self.opened, dtype=self.dtype, device=str(self.device), batch_size=self.batch_size,
                   policy=self.policy, offload_dir=s.offload_dir, cpu_memory=s.cpu_memory, gpu_memory=s.gpu_memory,
                   pipeline_stages=s.pipeline_stages)


def open_settings_model(settings: RunSettings) -> OpenedModel:
    model = settings.model
    if isinstance(model, OpenedModel):
        return model
    return open_model(default_model_path() if model is None else model)


def prepare_run(settings: RunSettings, gen_len: int, estimate: Callable[[OpenedModel], tuple],
                recorded: tuple[dict | None, int] | None = None, recorded_where: str = "",
                log=log_to_stderr) -> PreparedRun:
    """Open the model and choose the policy (see the module's docstring). `estimate(opened)`
    -> the fields of a WorkloadEstimate, asked only if the planner runs; `gen_len`: the
    tokens a sequence generates unless the estimate gives its own;
    `recorded`: (policy fields or None, block size) from an earlier run, named
    `recorded_where` in the message."""
    opened = open_settings_model(settings)
    device = pick_device(settings.device)
    dtype = parse_dtype(settings.dtype) or default_dtype(device)
    policy, batch_size, work = _choose(settings, opened, device, dtype, gen_len, estimate, recorded, recorded_where,
                                       log)
    policy = effective_policy(opened, policy, batch_size)
    return PreparedRun(settings, opened, device, dtype, policy, policy.block_size if policy else batch_size, work)


def _choose(settings, opened, device, dtype, gen_len, estimate, recorded, recorded_where, log):
    if settings.policy is not None:
        return settings.policy, settings.policy.block_size, None
    if recorded and settings.plan and settings.batch_size in (None, recorded[1]):
        log(f"policy and block size as recorded in {recorded_where}")
        return (Policy(**recorded[0]) if recorded[0] else None), recorded[1], None
    if not settings.plan:
        return None, settings.batch_size or DEFAULT_BATCH_SIZE, None
    prompt_len, num_sequences, asked_len, shared_prefix, grouped = WorkloadEstimate(*estimate(opened))
    # Up to every request of the job in one block: each decode step reads every weight once
    # whatever the rows in flight, so the fewer steps the better, and rows whose sequence
    # finished cost nothing on a CPU (the decode kernel computes the rows in flight alone;
    # on a large job, refill keeps them busy). Pipeline stages keep a block per stage in flight.
    max_block = max(1, num_sequences // settings.pipeline_stages)
    work = Workload(prompt_len, asked_len or gen_len, shared_prefix=shared_prefix, grouped_prompt_len=grouped)
    plan = plan_for(settings, opened, device, dtype, work, max_block, settings.batch_size, log)
    log_plan(plan, device, log, 0 if settings.pipeline_stages > 1 else None)
    return plan.best.policy, plan.best.policy.block_size, work


def prepare_scoring(settings: RunSettings, log=log_to_stderr) -> PreparedRun:
    """The run of a scoring workload (lm-eval's log-likelihoods): prefill-only packed rows of
    up to MAX_ROW_TOKENS, planned as prompts of that length that generate one token, so the
    planner weighs the prefill alone; blocks of up to MAX_SCORING_BLOCK rows."""
    from .engine.scoring import MAX_ROW_TOKENS

    def estimate(opened: OpenedModel) -> tuple[int, int]:
        # as many rows as a block may hold: the planner's blocks go up to the sequences estimated
        return min(MAX_ROW_TOKENS, opened.config.max_position_embeddings - 1), MAX_SCORING_BLOCK

    return prepare_run(settings, 1, estimate, log=log)


def plan_for(settings: RunSettings, opened: OpenedModel, device: torch.device, dtype: torch.dtype, work: Workload,
             max_block: int | None = None, block_size: int | None = None, log=log_to_stderr, stage: int = 0,
             gpu_batch_size: int | None = None) -> Plan:
    """The planner's plan for `work` within the settings' budgets, on this machine's profile
    (measured now if there is none; its compute speed and the offload disk's checked now).
    Over pipeline stages: the plan of stage `stage`'s layers, with a block per stage
    in flight; `gpu_batch_size` (with `block_size`) fixes the block's split."""
    from .engine.memory import detect_budget
    from .engine.pipeline import stage_layers
    from .profiling import at_current_speed, hardware_profile

    cfg, family = opened.config, get_family(opened.config)
    stages = settings.pipeline_stages
    if stages > 1:
        cfg = replace(cfg, num_layers=len(stage_layers(cfg.num_layers, stages, stage)))
        work = replace(work, blocks_in_flight=stages)
    budget = detect_budget(device, settings.gpu_memory, settings.cpu_memory)
    compression = planned_compression(settings.compression, lambda: layer_weight_grid(cfg, family, opened.source))
    disk_folder = Path(settings.offload_dir) if settings.offload_dir else cache_dir()
    profile = at_current_speed(hardware_profile(disk_folder, log=log), dtype, disk_folder)
    return plan_policy(cfg, family, dtype, device, profile, work, budget, max_block, compression=compression,
                       block_size=block_size, gpu_batch_size=gpu_batch_size)


def log_plan(plan: Plan, device: torch.device, log=log_to_stderr, stage: int | None = None) -> None:
    where = f"stage {stage}: " if stage is not None else ""
    log(f"planner: {where}{describe(plan.best, device.type == 'cuda')}")
    for note in plan.notes:
        log(f"planner: {where}{note}")


def planned_compression(compression: dict, grid: Callable[[], int | None]) -> dict:
    """The compression fields with the group size the LLM will use filled in (compressed
    weights without one follow the model's quantization grid, `grid()`; see
    Policy.group_size), since the planner must size them."""
    if compression.get("compress_weight") and compression.get("compress_group") is None:
        return {**compression, "compress_group": grid()}
    return compression


def describe(candidate: Candidate, gpu: bool = False) -> str:
    """One line: the candidate's block, placement, predicted speed and memory."""
    p = candidate.policy
    compressed = " + ".join(n for n, on in (("weights", p.compress_weight), ("KV cache", p.compress_cache)) if on)
    if compressed:
        compressed = f" ({compressed} compressed to {p.compress_bits} bits)"
    if gpu:
        where = lambda on_gpu, on_host: (f"{100 * on_gpu:.1f}% GPU, {100 * on_host:.1f}% host, "
                                         f"{100 * max(0.0, 1 - on_gpu - on_host):.1f}% disk")
        placement = (f"weights {where(p.weights_device, p.weights_host)}; KV cache "
                     f"{where(p.cache_device, p.cache_host)}{', CPU attention' if p.cpu_attention else ''}")
        memory = (f"GPU {sum(candidate.memory.device.values()) / 2**30:.2f} GiB, "
                  f"host {sum(candidate.memory.host.values()) / 2**30:.2f} GiB")
    else:
        placement = (f"weights {100 * p.weights_device:.1f}% in memory, "
                     f"KV cache {100 * p.cache_device:.1f}% in memory")
        memory = f"{candidate.memory_bytes / 2**30:.2f} GiB"
    return (f"block {p.gpu_batch_size}x{p.num_gpu_batches}{compressed}, {placement}: {candidate.throughput:.2f} "
            f"tok/s predicted (prefill {candidate.prefill_seconds:.1f}s + decode {candidate.decode_seconds:.1f}s "
            f"per block), {memory}")


def prompt_shape(tokenizer, prompts: Iterable[str | list[int] | list[dict]], limit: int,
                 sample: int = PROMPT_SAMPLE) -> PromptShape:
    """Tokens of the longest of the first `sample` prompts (text, token ids, or chat
    messages, which get the chat template), at least MIN_PROMPT_TOKENS: prompts over `limit`
    tokens will be refused one by one, so they do not count, nor does a conversation the
    template rejects; the leading tokens all of those prompts share, as the engine
    computes once: 0 unless there are two or more and it is at least MIN_SHARED_PREFIX long,
    and every prompt keeps a token of its own; and the tokens per prompt that the in-memory
    runner computes when they join together (longest first, in its groups)."""
    import os
    from itertools import islice

    from .engine.generation import MIN_SHARED_PREFIX

    ids = []
    for prompt in islice(prompts, sample):
        if tokenizer is None:
            continue
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], dict):
            try:
                prompt = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
            except Exception:  # the request gets its error later
                continue
        tokens = tokenizer(prompt)["input_ids"] if isinstance(prompt, str) else list(prompt)
        if len(tokens) <= limit:
            ids.append(tokens)
    shared = len(os.path.commonprefix(ids)[:min(map(len, ids), default=1) - 1]) if len(ids) > 1 else 0
    longest = max([MIN_PROMPT_TOKENS, *map(len, ids)])
    shared = shared if shared >= MIN_SHARED_PREFIX else 0
    return PromptShape(longest, shared, grouped_prompt_tokens(ids, shared) if ids else longest)


def grouped_prompt_tokens(prompts: list[list[int]], shared: int) -> float:
    """Prompt tokens per sequence that the in-memory runner computes for `prompts` joining
    together: laid out longest first as the engine lays them out, each group computed from
    where its longest prompt starts (engine.runner.prompt_groups), the shared prefix as if
    each computed it (the planner prices it once per block apart)."""
    from .engine.generation import prefix_layout
    from .engine.runner import prompt_groups

    ordered = sorted(prompts, key=len, reverse=True)
    _, valid = prefix_layout(ordered, shared, len(ordered[0]), 0)
    width = valid.shape[1]
    own = sum((group.stop - group.start) * (width - first) for group, first in prompt_groups(valid, shared))
    return shared + own / len(ordered)


def share_with_stages(place, run: PreparedRun) -> None:
    """The first pipeline stage's choice, sent to every other stage (`prepare_stage`)."""
    from .engine.pipeline import Link

    work = asdict(run.work) if run.work else None
    link = Link()
    for stage in range(1, place.stages):
        link.send(place.rank(stage), {"op": "setup", "policy": asdict(run.policy) if run.policy else None,
                                      "batch_size": run.batch_size, "work": work})
    link.flush()


def abort_stages(place, reason: str) -> None:
    """The first stage failed before its model loaded: the others stop waiting for it."""
    from .engine.pipeline import Link

    link = Link()
    for stage in range(1, place.stages):
        link.send(place.rank(stage), {"op": "abort", "message": reason})
    link.flush()


def prepare_stage(settings: RunSettings, place, log=log_to_stderr) -> PreparedRun | None:
    """A later pipeline stage's run: the first stage's block and compression, and, where the
    first stage planned, the placement the planner chooses for this stage's layers with
    them. None if the first stage gave up before loading (it reports why)."""
    from .engine.pipeline import Link

    header, _ = Link().recv(place.rank(0))
    if header["op"] == "abort":
        return None
    opened = open_settings_model(settings)
    device = pick_device(settings.device)
    dtype = parse_dtype(settings.dtype) or default_dtype(device)
    policy = Policy(**header["policy"]) if header["policy"] else None
    if policy is not None and header["work"]:
        compression = {k: v for k, v in asdict(policy).items() if k.startswith("compress_")}
        stage_settings = replace(settings, compression=compression)
        plan = plan_for(stage_settings, opened, device, dtype, Workload(**header["work"]), block_size=policy.block_size,
                        log=log, stage=place.stage, gpu_batch_size=policy.gpu_batch_size)
        log_plan(plan, device, log, place.stage)
        policy = plan.best.policy
    return PreparedRun(settings, opened, device, dtype, policy, header["batch_size"])
