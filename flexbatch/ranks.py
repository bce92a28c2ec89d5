"""Running under torchrun: this process's rank among the job's processes, and the one
meeting point at the end, where rank 0 merges the parts once every rank has finished.

torchrun (`python -m torch.distributed.run`) starts one process per rank with RANK,
WORLD_SIZE, LOCAL_RANK and the rendezvous address in the environment; that environment is
read here, at the top, and nowhere below.

The process group uses gloo, on CPU and GPU machines alike: the ranks exchange no tensors,
only a barrier that may wait hours for the slowest rank, and gloo's TCP barrier waits
quietly where NCCL's watchdog would abort a collective that long.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

from .errors import ConfigError

# How long a rank that finished waits for the others (their share of a long job).
BARRIER_TIMEOUT = timedelta(days=7)


@dataclass(frozen=True)
class Ranks:
    rank: int
    world: int
    local_rank: int
    attempt: int = 0  # torchrun's restarts of the job's processes so far

    @classmethod
    def from_env(cls, env=os.environ) -> "Ranks | None":
        """The ranks torchrun set up, or None for a single process (no WORLD_SIZE, or 1)."""
        try:
            world = int(env.get("WORLD_SIZE", "1"))
            rank, local_rank = int(env.get("RANK", "0")), int(env.get("LOCAL_RANK", "0"))
        except ValueError:
            raise ConfigError("WORLD_SIZE, RANK and LOCAL_RANK must be integers (torchrun sets them); "
                              f"got WORLD_SIZE={env.get('WORLD_SIZE')!r}, RANK={env.get('RANK')!r}.") from None
        if world <= 1:
            return None
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not env.get(k)]
        if missing:
            raise ConfigError(f"WORLD_SIZE={world} is set but {' and '.join(missing)} not: launch with torchrun "
                              "(python -m torch.distributed.run ... -m flexbatch run ...), or, with a scheduler that "
                              "only hands out an index, unset WORLD_SIZE and pass --shard INDEX/COUNT.")
        if not 0 <= rank < world:
            raise ConfigError(f"RANK={rank} is outside WORLD_SIZE={world}; launch with torchrun.")
        return cls(rank, world, local_rank, int(env.get("TORCHELASTIC_RESTART_COUNT", "0") or 0))

    def start(self) -> None:
        """Join the other ranks (returns once every rank has started)."""
        import torch.distributed as dist

        if dist.is_initialized():
            return
        # The rendezvous store can outlive a restart: keys of this attempt's own, so that no
        # rank reads the address a killed process published (its peers' connections would be
        # refused, or hang).
        store, rank, world = next(dist.rendezvous("env://", timeout=BARRIER_TIMEOUT))
        store = dist.PrefixStore(f"flexbatch/attempt-{self.attempt}", store)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=BARRIER_TIMEOUT)

    def device(self, requested: str) -> str:
        """With several GPUs on a node, each local rank takes its own (unless --device says)."""
        import torch

        if requested == "auto" and torch.cuda.is_available():
            return f"cuda:{self.local_rank % torch.cuda.device_count()}"
        return requested

    def wait_for_all(self) -> None:
        import torch.distributed as dist

        dist.barrier()

    def close(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
