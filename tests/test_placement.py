"""Placement rules as properties over arbitrary tensor sizes and fractions."""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from flexbatch.storage.placement import place_by_fraction, split_sequences
from flexbatch.storage.tiers import Tier

fractions = st.tuples(st.floats(0, 1), st.floats(0, 1)).filter(lambda f: f[0] + f[1] <= 1)


@settings(max_examples=300, deadline=None)
@given(sizes=st.lists(st.integers(1, 10_000), min_size=1, max_size=200), f=fractions)
def test_bytes_per_tier_within_one_tensor_of_target(sizes, f):
    shares = {Tier.DEVICE: f[0], Tier.HOST: f[1], Tier.DISK: 1 - f[0] - f[1]}
    placed = place_by_fraction(sizes, shares)
    total, largest = sum(sizes), max(sizes)
    for tier, share in shares.items():
        got = sum(s for s, t in zip(sizes, placed) if t is tier)
        assert abs(got - share * total) <= largest + 1e-6 * total
        if share == 0:
            assert got == 0


@given(batch=st.integers(1, 512), f=fractions)
def test_sequence_split_covers_the_batch(batch, f):
    shares = {Tier.DEVICE: f[0], Tier.HOST: f[1], Tier.DISK: 1 - f[0] - f[1]}
    counts = split_sequences(batch, shares)
    assert sum(counts.values()) == batch and all(c >= 0 for c in counts.values())
    # hand rule: the faster tiers get their share rounded down, the slowest tier with a share
    # (the device when none has one) takes the rest, so it never gets less than its share
    order = (Tier.DEVICE, Tier.HOST, Tier.DISK)
    slowest = next((t for t in reversed(order) if shares[t] > 0), Tier.DEVICE)
    for tier in order:
        target = batch * shares[tier]
        if tier is slowest:
            assert target - 1e-6 <= counts[tier] < target + len(order)
        else:
            assert target - 1 < counts[tier] <= target + 1e-6
