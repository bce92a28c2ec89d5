"""Assigning tensors to tiers so that the bytes on each tier match requested fractions."""
from __future__ import annotations

from typing import Sequence

from .tiers import Tier

ORDER = (Tier.DEVICE, Tier.HOST, Tier.DISK)


def place_by_fraction(sizes: Sequence[int], fractions: dict[Tier, float]) -> list[Tier]:
    """Walk the tensors in order, giving each to the tier furthest below its target so far.

    After every prefix of the walk, each tier's bytes are within one tensor's size of its
    fraction of the bytes walked so far, so the final totals are too, and every layer gets
    a similar mix (FlexGen's per-tensor midpoint rule can miss by a whole layer's share).
    """
    placed = {tier: 0 for tier in ORDER}
    total = 0
    result = []
    for size in sizes:
        total += size
        deficit = {tier: fractions.get(tier, 0.0) * total - placed[tier] for tier in ORDER}
        # Only tiers with a non-zero share are eligible; ties go to the faster tier.
        eligible = [t for t in ORDER if fractions.get(t, 0.0) > 0] or [Tier.DISK]
        tier = max(eligible, key=lambda t: (deficit[t], -ORDER.index(t)))
        placed[tier] += size
        result.append(tier)
    return result


def split_sequences(batch: int, fractions: dict[Tier, float]) -> dict[Tier, int]:
    """How many of a GPU batch's sequences keep their KV cache on each tier (rounded down
    for the faster tiers; the remainder goes to the slowest tier with a share)."""
    counts = {tier: int(batch * fractions.get(tier, 0.0) + 1e-9) for tier in ORDER}
    slowest = next((t for t in reversed(ORDER) if fractions.get(t, 0.0) > 0), Tier.DEVICE)
    counts[slowest] += batch - sum(counts.values())
    return counts
