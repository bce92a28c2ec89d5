"""What both machine models share: the workload, a layer's cost terms, and the arithmetic
that turns terms into a block's time.

A term is an array [constant, slope per placement variable]: its seconds at placement x are
constant + slopes . x. Every term of FlexGen's cost model is linear in the placement
fractions for fixed batch sizes, which is what lets the search solve a linear program.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..models.spec import ModelConfig
from .profile import ComputeRates


@dataclass(frozen=True)
class Workload:
    prompt_len: int  # the longest prompt: what the KV cache and the rows moved to and from disk hold
    gen_len: int
    blocks_in_flight: int = 1  # a pipeline stage keeps one block's KV cache per stage (engine/pipeline.py)
    # leading tokens every prompt shares (a system prompt, few-shot examples): an admission
    # computes them once for the block; offloaded, each row holds their keys and values
    shared_prefix: int = 0
    # prompt tokens per sequence that the in-memory runner computes, which prefills prompts
    # admitted together in groups, each from where its longest prompt starts, with the
    # padding that leaves (engine.runner.prompt_groups; None: prompt_len, as the offloading
    # runner pads an admission to its longest prompt)
    grouped_prompt_len: float | None = None

    def computed_prompt_len(self, in_memory: bool) -> float:
        """The prompt tokens per sequence that prefill computes and decode attention reads
        (the C kernel reads only the keys a row holds), by the runner a policy gets."""
        return (self.grouped_prompt_len or self.prompt_len) if in_memory else self.prompt_len


@dataclass(frozen=True)
class LayerCosts:
    """One layer's seconds per lane, for prefill (`pre`) and one decode step (`gen`). With
    overlap the lanes run at once and the layer takes the longest; without, the lanes named
    in `serial_lanes` (the threads' work) run in turn."""

    pre: dict[str, np.ndarray]
    gen: dict[str, np.ndarray]
    serial_lanes: tuple[str, ...]

    def lanes(self, phase: str) -> list[np.ndarray]:
        return list(getattr(self, phase).values())

    def serial(self, phase: str) -> np.ndarray:
        terms = getattr(self, phase)
        return sum(terms[name] for name in self.serial_lanes)


def term_value(term: np.ndarray, x) -> float:
    """A term's seconds at placement x."""
    return float(term[0] + np.dot(term[1:], x))


def weight_matmul_seconds(rates: ComputeRates, dtype: torch.dtype, bits: int | None, params: int, batch: int,
                          gpu_batch_size: int, rows_per_sequence: float, active_params: int | None = None) -> float:
    """One layer's weight matmuls for the whole block (`batch` sequences, `rows_per_sequence`
    token rows each, in GPU batches of gpu_batch_size). Compressed weights take the cheaper
    of the two ways the engine has: the fused int4 kernel per GPU batch, or one
    dequantization per layer load shared by every GPU batch, then dense matmuls. A token
    multiplies by `active_params` of the layer's `params` (fewer in a mixture of experts,
    though a large block still loads and dequantizes every expert)."""
    flop = batch * rows_per_sequence * 2 * (active_params or params)
    rows = gpu_batch_size * rows_per_sequence
    dense = flop / rates.flops(dtype, rows)
    if not bits:
        return dense
    rate = rates.dequantize_params_per_s.get(f"int{bits}")
    dense += params / rate if rate else 0.0
    fused = rates.flops(dtype, rows, bits)
    return min(dense, flop / fused) if fused else dense


def prefill_seconds(rates: ComputeRates, dtype: torch.dtype, bits: int | None, params: int,
                    active_params: int | None, width: int, batch: int, gpu_batch_size: int, work: Workload,
                    in_memory: bool) -> float:
    """One layer's prefill compute for a block: each sequence's tokens after the shared
    prefix through the weights, attending to the prefix and causally to each other, and the
    shared prefix once. width: the query heads times the head dim; in_memory: whether the
    policy runs on the in-memory runner (`Workload.computed_prompt_len`)."""
    p = work.shared_prefix
    own = work.computed_prompt_len(in_memory) - p
    seconds = weight_matmul_seconds(rates, dtype, bits, params, batch, gpu_batch_size, own, active_params) \
        + rates.attention_seconds(dtype, round(gpu_batch_size * own), batch * attention_flop(own, p, width))
    if p:
        seconds += weight_matmul_seconds(rates, dtype, bits, params, 1, 1, p, active_params) \
            + rates.attention_seconds(dtype, p, attention_flop(p, 0, width))
    return seconds


def attention_flop(queries: int, before: int, width: int) -> float:
    """FLOP of `queries` consecutive tokens attending to `before` keys and causally to each
    other (on average to half of their own): the scores and the weighted values."""
    return 4 * queries * (before + queries / 2) * width


def head_seconds(cfg: ModelConfig, dtype: torch.dtype, rates: ComputeRates, gpu_batch_size: int, batch: int,
                 gen_len: int) -> float:
    """The output projection runs once per generated token of every sequence (on the
    processor whose `rates` are given)."""
    flops = batch * gen_len * 2 * cfg.vocab_size * cfg.hidden_size
    return flops / rates.flops(dtype, gpu_batch_size)


def block_seconds(costs: LayerCosts, num_layers: int, gen_len: int, x, overlap: bool = True,
                  head: float = 0.0) -> tuple[float, float]:
    """(prefill seconds, decode seconds) of one block at placement x: a layer takes its
    longest lane when loads, stores and compute overlap, their sum if not."""

    def layer(phase: str) -> float:
        if overlap:
            return max(term_value(lane, x) for lane in costs.lanes(phase))
        return term_value(costs.serial(phase), x)

    return num_layers * layer("pre"), num_layers * (gen_len - 1) * layer("gen") + head
