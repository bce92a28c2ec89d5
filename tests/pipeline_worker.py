"""Run under torchrun by test_pipeline.py: every rank builds the same LLM over pipeline stages
and makes the same calls; the first stage writes the generated token ids as JSON.

argv: a JSON file with model, prompts, policy (Policy fields or null), stages, max_new_tokens,
out, and optionally calls (the same generate call repeated) and fail_on_stage_1 (stage 1's
decode steps raise after its first: a fault injected to test how failures travel)."""
import json
import os
import sys

import torch

torch.set_num_threads(1)

from flexbatch import LLM, SamplingParams  # noqa: E402
from flexbatch.config import Policy  # noqa: E402
from flexbatch.engine.offload_runner import OffloadRunner  # noqa: E402

spec = json.load(open(sys.argv[1]))
if spec.get("fail_on_stage_1") and os.environ["RANK"] == "1":
    step_hidden, steps = OffloadRunner.step_hidden, []

    def failing(self, *args):
        steps.append(1)
        if len(steps) > 1:
            raise RuntimeError("injected failure")
        return step_hidden(self, *args)
    OffloadRunner.step_hidden = failing
policy = Policy(**spec["policy"]) if spec["policy"] else None
llm = LLM(spec["model"], dtype="float32", policy=policy, batch_size=spec.get("batch_size", 4),
          pipeline_stages=spec["stages"])
try:
    for _ in range(spec.get("calls", 1)):
        outputs = llm.generate(spec["prompts"], SamplingParams(max_new_tokens=spec["max_new_tokens"]))
    home = (llm.pipeline or llm.stage_server).runner.home  # the global tensors this stage read
    with open(f"{spec['out']}.globals-of-rank{os.environ['RANK']}", "w") as f:
        json.dump(home.globals.held(), f)
finally:
    llm.close()
if outputs:
    with open(spec["out"], "w") as f:
        json.dump([o.token_ids for o in outputs], f)
