"""Whether to quantize the KV cache: the planner prices both and says why it chose one.

A 4-bit cache moves about a quarter of the bytes between tiers (on a decode-heavy job with
the cache on disk, the largest traffic there is) but every step dequantizes what it reads.
Which wins depends on where the cache lives, which the planner only knows once it has placed
it, so both settings are searched in full and compared.
"""
from __future__ import annotations

from dataclasses import replace

from ..config import COMPRESS_IF_FASTER as IF_FASTER
from ..errors import ConfigError
from ..sizing import kv_stored_bytes
from .search import Candidate, Plan
from .terms import Workload

WORTH_SAYING = 1.1  # a faster setting the user did not allow is pointed out from this speed-up on


def plan_weighing_cache_compression(search, compression: dict, kv_disk_read) -> Plan:
    """search(compression) -> Plan, for the setting asked (compress_cache True, False or
    IF_FASTER) and its alternative; the plan of the chosen one, with a note that says why.
    kv_disk_read(candidate) -> the KV bytes its decode reads from disk per step."""
    asked = compression.get("compress_cache", False)
    plans, errors = {}, {}
    for flag in (False, True):
        try:
            plans[flag] = search({**compression, "compress_cache": flag})
        except ConfigError as e:
            errors[flag] = e
    allowed = (False, True) if asked == IF_FASTER else (bool(asked),)
    feasible = [flag for flag in allowed if flag in plans]
    if not feasible:
        raise errors[allowed[-1]]
    chosen = max(feasible, key=lambda flag: plans[flag].best.throughput)
    other = plans.get(not chosen)
    note = _note(chosen, asked, plans[chosen].best, other.best if other else None, kv_disk_read)
    return replace(plans[chosen], notes=[*plans[chosen].notes, note])


def _note(chosen: bool, asked, mine: Candidate, other: Candidate | None, kv_read) -> str:
    state = "on" if chosen else "off"
    why = {True: "as asked (--compress-cache)", False: "not asked", IF_FASTER: "the planner's choice"}[asked]
    head = f"KV cache compression: {state}, {why}"
    if other is None:
        return f"{head}; {'un' if chosen else ''}compressed, no policy fits the budget"
    on, off = (mine, other) if chosen else (other, mine)
    traffic = (f"decode reads {kv_read(on) / 1e9:.2f} GB of KV cache from disk per step compressed, "
               f"{kv_read(off) / 1e9:.2f} GB uncompressed")
    if kv_read(off) == 0:
        traffic = "the uncompressed cache is not on disk, so compression saves no disk reads"
    speeds = f"predicted {on.throughput:.2f} tok/s compressed, {off.throughput:.2f} uncompressed"
    text = f"{head}: {speeds}; {traffic}"
    if asked is False and on.throughput >= WORTH_SAYING * off.throughput:
        text += " (--compress-cache-if-faster lets the planner compress it; outputs change slightly)"
    return text


def kv_disk_bytes_per_step(cfg, dtype, work: Workload):
    """candidate -> bytes of KV cache its decode reads from disk per step, at the mean context
    (as the cost model counts them: a compressed cache's dense window included)."""
    context = work.prompt_len + work.gen_len / 2

    def read(candidate: Candidate) -> float:
        p = candidate.policy
        return p.block_size * kv_stored_bytes(cfg, dtype, p, context) * cfg.num_layers * p.cache_disk
    return read
