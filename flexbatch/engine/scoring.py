"""Scoring continuations of shared contexts in one prefill pass.

Evaluation asks for log p(continuation | context) over many pairs, and multiple-choice
tasks repeat one context with several continuations. Each context is run once: a packed row
holds the context, then every continuation of it (all but its last token, which is only a
target), each continuation placed at the positions right after the context and attending to
the context and to itself only (`ops.segment_mask`). A row of context c and continuations
x_1..x_k costs c + sum(|x_i| - 1) tokens instead of k * (c + |x|) - k.

    context   c0 c1 c2 | x1a x1b | x2a        <- tokens of the row (x1c, x2b are targets only)
    position   0  1  2 |  3   4  |  3
    segment    0  0  0 |  1   1  |  2
    predicts  -- -- x1a,x2a x1b x1c  x2b      <- c2's hidden state predicts both first tokens
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

MAX_ROW_TOKENS = 1024  # a context with many continuations is split over rows of about this size


@dataclass
class Row:
    """One context and the continuations packed after it: (request index, continuation ids)."""

    context: list[int]
    continuations: list[tuple[int, list[int]]] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.context) + sum(len(c) - 1 for _, c in self.continuations)


@dataclass
class PackedRows:
    """A block of rows as tensors. S: the longest row; T: the most targets of a row."""

    input_ids: torch.Tensor  # [B, S] int64, right-padded
    positions: torch.Tensor  # [B, S] int64
    segments: torch.Tensor  # [B, S] int64: 0 context, i > 0 continuation i, -1 padding
    sources: torch.Tensor  # [B, T] int64: the index in the row whose hidden state predicts the target
    targets: torch.Tensor  # [B, T] int64
    spans: list[list[tuple[int, int, int]]]  # per row: (request index, first target, end)

    def rows(self, part: slice) -> "PackedRows":
        return PackedRows(self.input_ids[part], self.positions[part], self.segments[part], self.sources[part],
                          self.targets[part], self.spans[part])


def pack_by_context(pairs: list[tuple[list[int], list[int]]], max_row_tokens: int = MAX_ROW_TOKENS,
                    length_group=None) -> list[Row]:
    """Rows that score every (context, continuation) pair, each context once per row; longest
    rows first, so a block of consecutive rows wastes little on padding. A row grows past
    `max_row_tokens` only to hold a single pair that is longer. `length_group(tokens)`: pairs
    share a row only if their total lengths fall in one group (see Family.length_group)."""
    groups: dict[tuple, list[int]] = {}
    for i, (context, continuation) in enumerate(pairs):
        group = length_group(len(context) + len(continuation)) if length_group else None
        groups.setdefault((tuple(context), group), []).append(i)
    rows = []
    for (context, _), members in groups.items():
        row = Row(list(context))
        for i in sorted(members, key=lambda i: -len(pairs[i][1])):
            continuation = list(pairs[i][1])
            if row.continuations and row.num_tokens + len(continuation) - 1 > max_row_tokens:
                rows.append(row)
                row = Row(list(context))
            row.continuations.append((i, continuation))
        rows.append(row)
    return sorted(rows, key=lambda r: -r.num_tokens)


def to_tensors(rows: list[Row], pad_id: int) -> PackedRows:
    width = max(r.num_tokens for r in rows)
    num_targets = max(sum(len(c) for _, c in r.continuations) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    segments = torch.full((len(rows), width), -1, dtype=torch.long)
    sources = torch.zeros((len(rows), num_targets), dtype=torch.long)
    targets = torch.zeros((len(rows), num_targets), dtype=torch.long)
    spans = []
    for b, row in enumerate(rows):
        m = len(row.context)
        ids[b, :m] = torch.tensor(row.context)
        positions[b, :m] = torch.arange(m)
        segments[b, :m] = 0
        at, first, row_spans = m, 0, []
        for seg, (index, continuation) in enumerate(row.continuations, start=1):
            n = len(continuation)
            ids[b, at:at + n - 1] = torch.tensor(continuation[:-1], dtype=torch.long)
            positions[b, at:at + n - 1] = torch.arange(m, m + n - 1)
            segments[b, at:at + n - 1] = seg
            sources[b, first] = m - 1  # the context's last token predicts the first continuation token
            sources[b, first + 1:first + n] = torch.arange(at, at + n - 1)
            targets[b, first:first + n] = torch.tensor(continuation)
            row_spans.append((index, first, first + n))
            at, first = at + n - 1, first + n
        spans.append(row_spans)
    return PackedRows(ids, positions, segments, sources, targets, spans)
