"""The JobSettings of a run, from the model, dtype, policy and block size it runs with."""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch

from ..config import Policy
from .job import Job
from .manifest import JobSettings, model_fingerprint


def job_settings(job: Job, model_path: Path, dtype: torch.dtype, policy: Policy | None,
                 block_size: int) -> JobSettings:
    spec = job.spec
    defaults = asdict(spec.defaults)
    defaults.update(stop=list(spec.defaults.stop), stop_token_ids=list(spec.defaults.stop_token_ids))
    return JobSettings(input_format=job.format, column=spec.column, chat=spec.chat,
                       model=str(Path(model_path).resolve()), model_fingerprint=model_fingerprint(model_path),
                       dtype=str(dtype).removeprefix("torch."), policy=asdict(policy) if policy else None,
                       block_size=block_size, window=job.window, defaults=defaults)
