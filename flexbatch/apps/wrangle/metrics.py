"""Scores of wrangling answers against labels: precision, recall and F1 of "Yes" (a match, an
error) for match and detect; accuracy (case- and space-insensitive) for impute."""
from __future__ import annotations


def binary_metrics(pairs: list[tuple[str | None, str]]) -> dict:
    """pairs: (predicted "Yes"/"No"/None, label "Yes"/"No"). An unparsed answer counts as "No"."""
    tp = sum(1 for p, y in pairs if p == "Yes" and y == "Yes")
    fp = sum(1 for p, y in pairs if p == "Yes" and y == "No")
    fn = sum(1 for p, y in pairs if p != "Yes" and y == "Yes")
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"n": len(pairs), "tp": tp, "fp": fp, "fn": fn, "precision": precision, "recall": recall, "f1": f1,
            "unparsed": sum(1 for p, _ in pairs if p is None)}


def accuracy(pairs: list[tuple[str | None, str]]) -> dict:
    correct = sum(1 for p, y in pairs if p is not None and _norm(p) == _norm(y))
    return {"n": len(pairs), "correct": correct, "accuracy": correct / len(pairs) if pairs else 0.0,
            "unparsed": sum(1 for p, _ in pairs if p is None)}


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def table(metrics: dict) -> str:
    """The metrics as two aligned lines (names, values)."""
    names = [k for k in metrics if not isinstance(metrics[k], (dict, list))]
    cells = [f"{metrics[k]:.3f}" if isinstance(metrics[k], float) else str(metrics[k]) for k in names]
    widths = [max(len(a), len(b)) for a, b in zip(names, cells)]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in (names, cells))
