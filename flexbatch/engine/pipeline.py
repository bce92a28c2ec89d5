"""Pipeline stages over torch.distributed (FlexGen §4.4): a model too large to run fast in one
process runs as a chain of processes, each holding a contiguous range of its layers and
offloading within its own memory by its own policy.

Stage 0 (the leader) runs everything above the runner interface: the decoding loop, the
job, the API. Its runners are `PipelineLane`s: each call computes stage 0's layers, sends the
hidden states on, and waits for the last stage to send back the logits. Every other stage
runs a `StageServer`, which receives a message from the stage before, runs its own layers
for it and passes the result on; the last stage applies the head and replies to the leader.
A failure in any stage travels on as an error message and is raised by the leader's call.

A stage would idle while the others compute its block's token, so each stage keeps several
blocks in flight, its lanes (as many as there are stages, as FlexGen's inner iterations): the
leader decodes each lane's block in a thread of its own, and while stage 1 computes lane 0,
stage 0 computes lane 1. Lanes share their stage's weights; each keeps its own KV cache.

Messages are a JSON header and tensors sent as raw bytes over point-to-point sends (gloo on
CPU and GPU alike; tensors cross through host memory): nothing is unpickled.
"""
from __future__ import annotations

import json
import queue
import threading
import time
from dataclasses import dataclass

import torch

from ..errors import ConfigError, StageLostError
from .offload_runner import OffloadRunner
from .runner import Runner
from .token_scores import TokenScores


@dataclass(frozen=True)
class StagePlace:
    """Where a process sits: stage `stage` of `stages`, in the pipeline whose stage 0 has the
    global rank `first_rank` (a job split in shards runs one pipeline per shard)."""

    stage: int
    stages: int
    first_rank: int

    @classmethod
    def of(cls, rank: int, world: int, stages: int) -> "StagePlace":
        if stages < 1 or world % stages:
            raise ConfigError(f"--pipeline-stages {stages} must divide the {world} processes started (WORLD_SIZE): "
                              f"launch torchrun with --nproc-per-node (times --nnodes) a multiple of {stages}.")
        return cls(rank % stages, stages, rank - rank % stages)

    @property
    def first(self) -> bool:
        return self.stage == 0

    @property
    def last(self) -> bool:
        return self.stage == self.stages - 1

    def rank(self, stage: int) -> int:
        return self.first_rank + stage


def stage_layers(num_layers: int, stages: int, stage: int) -> range:
    """The contiguous layers of `stage`: every layer of a model holds the same bytes, and every
    stage the same global tensors, so equal counts balance the bytes (earlier stages take the
    remainder)."""
    if num_layers < stages:
        raise ConfigError(f"--pipeline-stages {stages} exceeds the model's {num_layers} layers; use at most "
                          f"{num_layers} stages.")
    base, extra = divmod(num_layers, stages)
    start = stage * base + min(stage, extra)
    return range(start, start + base + (stage < extra))


class Link:
    """Messages between stage processes: sends are asynchronous (a stage passes its result on
    and goes back to computing), and one destination's sends complete in order."""

    def __init__(self):
        self._pending: dict[int, list] = {}  # destination -> (works, tensors they send)

    def send(self, dst: int, header: dict, tensors=()) -> None:
        import torch.distributed as dist

        self._wait(dst)
        tensors = [t.detach().cpu().contiguous() for t in tensors]
        header = {**header, "tensors": [[list(t.shape), str(t.dtype).removeprefix("torch.")] for t in tensors]}
        data = torch.tensor(list(json.dumps(header).encode()), dtype=torch.uint8)
        pieces = [torch.tensor([data.numel()], dtype=torch.int64), data,
                  *(t.reshape(-1).view(torch.uint8) for t in tensors if t.numel())]
        self._pending[dst] = [(dist.isend(p, dst), p) for p in pieces]

    def _wait(self, dst: int) -> None:
        for work, _ in self._pending.pop(dst, []):
            work.wait()

    def flush(self) -> None:
        for dst in list(self._pending):
            self._wait(dst)

    def recv(self, src: int) -> tuple[dict, list[torch.Tensor]]:
        import torch.distributed as dist

        size = torch.empty(1, dtype=torch.int64)
        dist.recv(size, src)
        data = torch.empty(int(size), dtype=torch.uint8)
        dist.recv(data, src)
        header = json.loads(bytes(data.tolist()))
        tensors = []
        for shape, dtype in header.pop("tensors"):
            tensor = torch.empty(shape, dtype=getattr(torch, dtype))
            if tensor.numel():
                dist.recv(tensor.reshape(-1).view(torch.uint8), src)
            tensors.append(tensor)
        return header, tensors


@dataclass
class StageTimes:
    """Where a stage's time went: computing its layers, or waiting (for the stage before it, or
    on the first stage for its lanes' replies while no lane computes)."""

    calls: int = 0
    compute_s: float = 0.0
    wait_s: float = 0.0

    def describe(self, place: StagePlace, layers: range) -> str:
        return (f"pipeline stage {place.stage} of {place.stages} (layers {layers.start}-{layers.stop - 1}): "
                f"{self.calls} calls, {self.compute_s:.1f}s computing, {self.wait_s:.1f}s waiting")


NO_SCORING = "scoring (score, eval) does not run over pipeline stages yet; run it without --pipeline-stages."


class StageError(ConfigError):
    """A later stage failed on a call of the leader's (its message names the stage)."""


class Pipeline:
    """The leader's side: stage 0's runner, its lanes, and the replies of the last stage."""

    def __init__(self, place: StagePlace, runner: OffloadRunner):
        self.place, self.runner, self.link = place, runner, Link()
        self.lanes = [PipelineLane(self, t, runner if t == 0 else runner.lane(t)) for t in range(runner.lanes)]
        self._lock = threading.Lock()  # one computes and sends at a time
        self._replies = [queue.SimpleQueue() for _ in self.lanes]
        self._lost: str | None = None  # why the last stage can no longer be heard
        self.times = StageTimes()
        self._idle_since = time.perf_counter()  # no lane has computed since then
        self._listener = threading.Thread(target=self._listen, name="flexbatch-pipeline", daemon=True)
        self._listener.start()

    def call(self, lane: int, header: dict, compute=lambda: [], tensors=()) -> list[torch.Tensor]:
        """Run compute() (stage 0's part: hidden states to pass on, or nothing), send them
        with `header` and `tensors` down the pipeline, and return the last stage's reply."""
        with self._lock:
            began = time.perf_counter()
            self.times.wait_s += began - self._idle_since
            hidden = compute()
            self._send({**header, "lane": lane}, [*tensors, *(hidden or [])])
            self._idle_since = time.perf_counter()
            self.times.compute_s += self._idle_since - began
            self.times.calls += 1
        while True:
            if self._lost:
                raise StageLostError(self._lost)
            try:
                reply, tensors = self._replies[lane].get(timeout=1.0)
                break
            except queue.Empty:
                continue
        if reply["op"] == "error":
            raise StageError(reply["message"])
        return tensors

    def _send(self, header: dict, tensors=()) -> None:
        if self._lost:
            raise StageLostError(self._lost)
        try:
            self.link.send(self.place.rank(1), header, tensors)
        except RuntimeError as error:  # gloo: the next stage's process is gone
            self._lost = f"pipeline stage 1 stopped answering ({error}); see that process's output."
            raise StageLostError(self._lost) from error

    def _listen(self) -> None:
        try:
            while True:
                reply, tensors = self.link.recv(self.place.rank(self.place.stages - 1))
                if reply["op"] == "closed":
                    return
                self._replies[reply["lane"]].put((reply, tensors))
        except Exception as error:  # a stage's process ended: every waiting call hears it
            self._lost = f"a pipeline stage stopped answering ({error}); see the other processes' output."

    def end_call(self) -> None:
        """The leader's API call ended (the other stages' matching calls return)."""
        with self._lock:
            self._send({"op": "done"})

    def close(self) -> None:
        if not self._listener.is_alive() and self._lost is None:
            return  # closed already
        if self._lost is None:
            with self._lock:
                self._send({"op": "close"})
                self.link.flush()
            self._listener.join()
        for lane in reversed(self.lanes):
            lane.runner.close()


class PipelineLane(Runner):
    """One block in flight through the pipeline, as the decoding loop sees it: a `Runner`."""

    def __init__(self, pipeline: Pipeline, lane: int, runner: OffloadRunner):
        self.pipeline, self.lane, self.runner = pipeline, lane, runner

    def _call(self, header: dict, compute=lambda: [], tensors=()) -> list[torch.Tensor]:
        return self.pipeline.call(self.lane, header, compute, tensors)

    def begin(self, batch_size: int, capacity: int, prompt_width: int | None = None) -> None:
        try:
            self._call({"op": "begin", "batch_size": batch_size, "capacity": capacity, "prompt_width": prompt_width},
                       lambda: self.runner.begin(batch_size, capacity, prompt_width))
        except BaseException:
            self.runner.end()
            raise

    def step(self, input_ids: torch.Tensor, key_valid: torch.Tensor, start: int,
             rows: list[int] | None = None) -> torch.Tensor:
        r = self.runner
        compute = lambda: r.step_hidden(r.step_inputs(input_ids), key_valid, start)
        logits = self._call({"op": "step", "start": start}, compute, [key_valid])[0]
        return logits if rows is None else logits[rows]

    def admit(self, rows: list[int], input_ids: torch.Tensor, key_valid: torch.Tensor, end: int,
              shared: int = 0) -> torch.Tensor:
        r = self.runner
        compute = lambda: r.admit_hidden(rows, r.admit_inputs(input_ids, shared, rows), key_valid, end, shared)
        return self._call({"op": "admit", "rows": rows, "end": end, "shared": shared}, compute, [key_valid])[0]

    def shift(self, offset: int, end: int) -> None:
        self._call({"op": "shift", "offset": offset, "end": end}, lambda: self.runner.shift(offset, end))

    def end(self) -> None:
        self._call({"op": "end"}, self.runner.end)

    def recomputes_at(self, length: int) -> bool:
        return self.runner.recomputes_at(length)

    def score(self, input_ids: torch.Tensor, key_valid: torch.Tensor, piece: int | None = None,
              top: int = 0) -> TokenScores:
        raise ConfigError(NO_SCORING)

    def score_packed(self, rows) -> TokenScores:
        raise ConfigError(NO_SCORING)

    def close(self) -> None:
        self.pipeline.close()


class StageServer:
    """A stage after the first: serves the messages of the stage before it."""

    def __init__(self, place: StagePlace, runner: OffloadRunner):
        self.place, self.runner, self.link = place, runner, Link()
        self.lanes = [runner if t == 0 else runner.lane(t) for t in range(runner.lanes)]
        self.closed = False
        self.times = StageTimes()

    def serve(self, until_done: bool = False) -> None:
        """Handle messages until the leader closes the pipeline (or, with `until_done`, ends
        its current API call)."""
        while not self.closed:
            began = time.perf_counter()
            header, tensors = self.link.recv(self.place.rank(self.place.stage - 1))
            received = time.perf_counter()
            self.times.wait_s += received - began
            op = header["op"]
            if op in ("done", "close"):
                self._pass_on(header, [])
                self.closed = op == "close"
                if until_done or self.closed:
                    break
                continue
            if op != "error":
                try:
                    header, tensors = self._handle(header, tensors)
                except Exception as error:  # the leader raises it; this stage serves on
                    where = f"pipeline stage {self.place.stage} (layers {self.runner.layers.start}-" \
                            f"{self.runner.layers.stop - 1})"
                    header, tensors = {"op": "error", "lane": header["lane"], "message": f"{where}: {error}"}, []
            self._pass_on(header, tensors)
            self.times.calls += 1
            self.times.compute_s += time.perf_counter() - received
        self.link.flush()

    def _pass_on(self, header: dict, tensors: list[torch.Tensor]) -> None:
        if not self.place.last:
            self.link.send(self.place.rank(self.place.stage + 1), header, tensors)
        elif header["op"] == "close":
            self.link.send(self.place.rank(0), {"op": "closed"})
        elif header["op"] != "done":
            reply = header if header["op"] == "error" else {**header, "op": "reply"}
            self.link.send(self.place.rank(0), reply, tensors)

    def _handle(self, header: dict, tensors: list[torch.Tensor]) -> tuple[dict, list[torch.Tensor]]:
        """Run this stage's part of a call; returns what goes on (the last stage: the reply)."""
        lane, op = self.lanes[header["lane"]], header["op"]
        if op == "begin":
            lane.begin(header["batch_size"], header["capacity"], header["prompt_width"])
        elif op == "shift":
            lane.shift(header["offset"], header["end"])
        elif op == "end":
            lane.end()
        if op not in ("step", "admit"):
            return header, []
        key_valid, inputs = tensors[0], tensors[1:]
        if op == "step":
            hidden = lane.step_hidden(inputs, key_valid, header["start"])
        else:
            hidden = lane.admit_hidden(header["rows"], inputs, key_valid, header["end"], header["shared"])
        if not self.place.last:
            return header, [key_valid, *hidden]
        joining = hidden[1:] if op == "admit" and header["shared"] else hidden
        return header, [lane.last_logits(joining)]

    def close(self) -> None:
        """Wait for the leader to close the pipeline, then release this stage."""
        if not self.closed:
            self.serve()
        for lane in reversed(self.lanes):
            lane.close()
