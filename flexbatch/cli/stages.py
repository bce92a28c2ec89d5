"""Pipeline stages from the command line: `--pipeline-stages N` under torchrun splits the
model's layers over every N consecutive ranks (engine/pipeline.py). The first stage of each
pipeline runs the command as usual; the others load their layers and serve it."""
from __future__ import annotations

import sys

from ..errors import ConfigError
from ..ranks import Ranks


def add_pipeline_arg(p) -> None:
    p.add_argument("--pipeline-stages", type=int, default=1, metavar="N",
                   help="split the model's layers over N processes started by torchrun (--nproc-per-node N; a "
                        "multiple of N also splits the job, one pipeline per shard). Each process runs its layers "
                        "under its own policy and memory, planned for them; the first one writes the results")


def stage_place(args, ranks: Ranks | None):
    """This process's StagePlace, or None without pipeline stages."""
    from ..engine.pipeline import StagePlace

    stages = args.pipeline_stages
    if stages < 1:
        raise ConfigError(f"--pipeline-stages must be >= 1, got {stages}")
    if stages == 1:
        return None
    if ranks is None:
        raise ConfigError(f"--pipeline-stages {stages} needs one process per stage: launch the command with "
                          f"`torchrun --nproc-per-node {stages} -m flexbatch ...`.")
    return StagePlace.of(ranks.rank, ranks.world, stages)


def lead_stages(place, prepare):
    """prepare() -> a PreparedRun, on the first stage: the run's choice is sent to the other
    stages, or, if prepare fails, they stop waiting."""
    from ..prepare import abort_stages, share_with_stages

    try:
        prepared = prepare()
    except BaseException as error:
        if place is not None:
            abort_stages(place, str(error))
        raise
    if place is not None:
        share_with_stages(place, prepared)
    return prepared


def serve_stage(args, place) -> None:
    """A later stage's whole run: load its layers as the first stage chose, serve until the
    first stage closes."""
    from ..prepare import prepare_stage
    from .common import run_settings

    run = prepare_stage(run_settings(args), place)
    if run is not None:
        llm = run.build_llm()
        llm.close()
        print(stage_report(llm), file=sys.stderr)


def stage_report(llm) -> str:
    """Where this process's stage spent its time (engine/pipeline.StageTimes)."""
    stage = llm.pipeline or llm.stage_server
    return stage.times.describe(stage.place, stage.runner.layers)
