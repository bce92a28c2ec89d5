"""Scoring continuations of shared contexts in one prefill pass.

Evaluation asks for log p(continuation | context) over many pairs, and multiple-choice
tasks repeat one context with several continuations. Each context is run once: a `Group`
holds the context, then every continuation of it (all but its last token, which is only a
target), each continuation placed at the positions right after the context and attending to
the context and to itself only (`ops.segment_mask`). A group of context c and continuations
x_1..x_k costs c + sum(|x_i| - 1) tokens instead of k * (c + |x|) - k.

    context   c0 c1 c2 | x1a x1b | x2a        <- tokens of a group (x1c, x2b are targets only)
    position   0  1  2 |  3   4  |  3
    segment    0  0  0 |  1   1  |  2
    predicts  -- -- x1a,x2a x1b x1c  x2b      <- c2's hidden state predicts both first tokens

A packed row holds as many groups as fit in about MAX_ROW_TOKENS, each with its own
positions from 0, seeing only its own tokens (the row's `groups` tensor says whose each
token is). Short contexts (a multiple-choice question of 100 tokens) then still fill rows of
about a thousand tokens: every linear layer multiplies a thousand rows at once, at the
CPU's matmul rate, and a block of a few rows reads each layer's weights once for thousands
of tokens (the block size the planner chose for rows of this width).
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field

import torch

from ..errors import ConfigError
from ..progress import TokenProgress

MAX_ROW_TOKENS = 1024  # rows are filled with groups up to about this size


@dataclass
class Group:
    """One context and the continuations packed after it: (request index, continuation ids)."""

    context: list[int]
    continuations: list[tuple[int, list[int]]] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.context) + sum(len(c) - 1 for _, c in self.continuations)


@dataclass
class Row:
    """Groups computed side by side in one row, each on its own."""

    groups: list[Group] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(g.num_tokens for g in self.groups)


@dataclass
class PackedRows:
    """A block of rows as tensors. S: the longest row; T: the most targets of a row."""

    input_ids: torch.Tensor  # [B, S] int64, right-padded
    positions: torch.Tensor  # [B, S] int64: from 0 in each group
    groups: torch.Tensor  # [B, S] int64: the group of the row a token belongs to, -1 padding
    segments: torch.Tensor  # [B, S] int64: 0 a group's context, i > 0 continuation i of the row, -1 padding
    sources: torch.Tensor  # [B, T] int64: the index in the row whose hidden state predicts the target
    targets: torch.Tensor  # [B, T] int64
    spans: list[list[tuple[int, int, int]]]  # per row: (request index, first target, end)

    def rows(self, part: slice) -> "PackedRows":
        return PackedRows(self.input_ids[part], self.positions[part], self.groups[part], self.segments[part],
                          self.sources[part], self.targets[part], self.spans[part])


def pack_by_context(pairs: list[tuple[list[int], list[int]]], max_row_tokens: int = MAX_ROW_TOKENS,
                    length_group=None) -> list[Row]:
    """Rows that score every (context, continuation) pair, each context once per group,
    longest rows first (a block of consecutive rows wastes little on padding). A group grows
    past `max_row_tokens` only to hold a single pair that is longer. `length_group(tokens)`:
    pairs share a group, and groups a row, only if their total lengths fall in one length
    group (see Family.length_group)."""
    by_context: dict[tuple, list[int]] = {}
    for i, (context, continuation) in enumerate(pairs):
        kind = length_group(len(context) + len(continuation)) if length_group else None
        by_context.setdefault((tuple(context), kind), []).append(i)
    groups: dict[object, list[Group]] = {}
    for (context, kind), members in by_context.items():
        group = Group(list(context))
        for i in sorted(members, key=lambda i: -len(pairs[i][1])):
            continuation = list(pairs[i][1])
            if group.continuations and group.num_tokens + len(continuation) - 1 > max_row_tokens:
                groups.setdefault(kind, []).append(group)
                group = Group(list(context))
            group.continuations.append((i, continuation))
        groups.setdefault(kind, []).append(group)
    rows = [row for same_kind in groups.values() for row in fill_rows(same_kind, max_row_tokens)]
    return sorted(rows, key=lambda r: -r.num_tokens)


def fill_rows(groups: list[Group], max_row_tokens: int) -> list[Row]:
    """Groups placed in rows of at most `max_row_tokens` (a longer group alone): largest
    first, each into the row it fills best (best-fit decreasing, near the fewest rows)."""
    rows: list[Row] = []
    room: list[tuple[int, int]] = []  # (tokens a row still has room for, its index), ascending
    for group in sorted(groups, key=lambda g: -g.num_tokens):
        size = group.num_tokens
        at = bisect.bisect_left(room, (size, -1))
        if at < len(room):
            left, index = room.pop(at)
        else:
            left, index = max_row_tokens, len(rows)
            rows.append(Row())
        rows[index].groups.append(group)
        if left - size > 0:
            bisect.insort(room, (left - size, index))
    return rows


def to_tensors(rows: list[Row], pad_id: int) -> PackedRows:
    width = max(r.num_tokens for r in rows)
    num_targets = max(sum(len(c) for g in r.groups for _, c in g.continuations) for r in rows)
    shape = (len(rows), width)
    ids, positions = torch.full(shape, pad_id, dtype=torch.long), torch.zeros(shape, dtype=torch.long)
    groups, segments = torch.full(shape, -1, dtype=torch.long), torch.full(shape, -1, dtype=torch.long)
    sources = torch.zeros((len(rows), num_targets), dtype=torch.long)
    targets = torch.zeros((len(rows), num_targets), dtype=torch.long)
    spans = []
    for b, row in enumerate(rows):
        at, first, seg, row_spans = 0, 0, 1, []
        for g, group in enumerate(row.groups):
            m = len(group.context)
            ids[b, at:at + m] = torch.tensor(group.context)
            positions[b, at:at + m] = torch.arange(m)
            groups[b, at:at + group.num_tokens] = g
            segments[b, at:at + m] = 0
            last_of_context, at = at + m - 1, at + m
            for index, continuation in group.continuations:
                n = len(continuation)
                ids[b, at:at + n - 1] = torch.tensor(continuation[:-1], dtype=torch.long)
                positions[b, at:at + n - 1] = torch.arange(m, m + n - 1)
                segments[b, at:at + n - 1] = seg
                sources[b, first] = last_of_context  # it predicts each continuation's first token
                sources[b, first + 1:first + n] = torch.arange(at, at + n - 1)
                targets[b, first:first + n] = torch.tensor(continuation)
                row_spans.append((index, first, first + n))
                at, first, seg = at + n - 1, first + n, seg + 1
        spans.append(row_spans)
    return PackedRows(ids, positions, groups, segments, sources, targets, spans)


def score_pairs(runner, pairs: list[tuple[list[int], list[int]]], pad_id: int, batch_size: int,
                length_group=None, progress: bool = False) -> list[tuple[list[float], list[bool]]]:
    """(log-probabilities, greedy flags) of each continuation's tokens given its context, for
    (context, continuation) id pairs: packed rows, `batch_size` rows a block (fewer where
    wide rows would not fit the runner's memory budget), through `runner.score_packed`."""
    rows = pack_by_context(pairs, row_tokens_that_fit(runner), length_group)
    results: list[tuple[list[float], list[bool]] | None] = [None] * len(pairs)
    bar = TokenProgress(total=len(pairs), enabled=progress, desc="scoring")
    s = 0
    while s < len(rows):  # rows come longest first: a block's first row is its widest
        fitting = runner.most_scored_rows(rows[s].num_tokens, batch_size)
        if not fitting:  # only the first, widest row can fail this: before any block has run
            raise ConfigError(f"a packed row of {rows[s].num_tokens} tokens (a context and its continuations) "
                              "does not fit the memory budget beside the weights: shorten the context, or put "
                              "more weights on disk.")
        packed = to_tensors(rows[s:s + fitting], pad_id)
        s += fitting
        scores = runner.score_packed(packed)
        for b, spans in enumerate(packed.spans):
            for index, first, end in spans:
                results[index] = (scores.logprobs[b, first:end].tolist(), scores.greedy[b, first:end].tolist())
            bar.add_requests(len(spans))
        bar.add_tokens(packed.input_ids.numel())
    bar.close()
    return results


def row_tokens_that_fit(runner) -> int:
    """How many tokens the groups of a row may fill: MAX_ROW_TOKENS, or fewer where one row of
    that many would not fit the runner's memory budget (a policy chosen by hand for a tight
    budget; the planner sizes scoring blocks for rows of MAX_ROW_TOKENS)."""
    tokens = MAX_ROW_TOKENS
    while tokens > 64 and not runner.most_scored_rows(tokens, 1):
        tokens //= 2
    return tokens
