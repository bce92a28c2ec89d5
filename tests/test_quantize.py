"""Group-wise quantization: error bound per group, exact packing, odd sizes."""
from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flexbatch.kernels.quant import QuantConfig, dequantize, pack_nibbles, quantize, unpack_nibbles


@st.composite
def cases(draw):
    ndim = draw(st.integers(1, 3))
    shape = tuple(draw(st.lists(st.integers(1, 40), min_size=ndim, max_size=ndim)))
    cfg = QuantConfig(bits=draw(st.sampled_from([4, 8])), group_size=draw(st.sampled_from([2, 4, 8, 64])),
                      group_dim=draw(st.integers(0, ndim - 1)))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([1e-3, 1.0, 100.0]))
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale
    if draw(st.booleans()):  # constant stretches must survive too
        x.view(-1)[: x.numel() // 2] = 0.5
    return x, cfg


@settings(max_examples=200, deadline=None)
@given(cases())
def test_round_trip_error_is_at_most_half_a_step_per_group(case):
    x, cfg = case
    qt = quantize(x, cfg)
    back = dequantize(qt)
    assert back.shape == x.shape and back.dtype == x.dtype
    # the step of the group each element belongs to, broadcast back to x's shape
    step = qt.step.expand(*qt.step.shape[:cfg.group_dim + 1], cfg.group_size, *qt.step.shape[cfg.group_dim + 2:])
    step = step.reshape(*step.shape[:cfg.group_dim], -1, *step.shape[cfg.group_dim + 2:])
    step = step.narrow(cfg.group_dim, 0, x.shape[cfg.group_dim])
    tolerance = step / 2 + 1e-6 * (x.abs() + step * cfg.levels) + 1e-12
    assert torch.all((back - x).abs() <= tolerance)


@given(st.lists(st.integers(0, 15), min_size=2, max_size=64).filter(lambda v: len(v) % 2 == 0))
def test_packing_is_exact_and_uses_high_nibble_first(values):
    q = torch.tensor(values, dtype=torch.uint8)
    packed = pack_nibbles(q, 0)
    assert packed.tolist() == [(values[i] << 4) | values[i + 1] for i in range(0, len(values), 2)]
    assert unpack_nibbles(packed, 0).tolist() == values


def test_four_bits_take_a_quarter_of_bf16_bytes_plus_scales():
    w = torch.randn(256, 512, dtype=torch.bfloat16)
    qt = quantize(w, QuantConfig(bits=4, group_size=64, group_dim=0))
    assert qt.data.numel() == w.numel() // 2
    assert qt.nbytes() == w.numel() // 2 + 2 * (256 // 64) * 512 * 2
