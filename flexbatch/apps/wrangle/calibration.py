"""Yes/No answers decided by a calibrated threshold instead of the model's first choice.

A small model can rank pairs well and still lean to one answer: the 135M default model
answers "No" to every FEBRL pair (F1 0), yet log p(Yes) - log p(No) puts the true matches
first (AUC 0.90 with 3 examples and free-text answers). So each binary question asks for the top alternatives of
every generated token; its score is log p(Yes) - log p(No) at the token where the answer
starts, under the model's unconstrained distribution. A threshold fitted on labeled pool rows
that are not shown as examples (they are asked like the others) turns scores into answers.
"""
from __future__ import annotations

import math
import re

TOP_ALTERNATIVES = 20  # per generated token: Yes and No are nearly always among them
WORDS = ("yes", "no")
_ANSWER_START = re.compile(r'"answer"\s*:\s*"')


def token_alternatives(choice: dict) -> tuple[list[str], list[dict[str, float]]] | None:
    """(token texts, {alternative text: logprob} per token) of a result's choice, completions
    or chat form; None without logprobs."""
    logprobs = choice.get("logprobs")
    if not logprobs:
        return None
    if "content" in logprobs:
        content = logprobs["content"] or []
        return ([c["token"] for c in content],
                [{a["token"]: a["logprob"] for a in c.get("top_logprobs") or []} for c in content])
    return logprobs["tokens"], [top or {} for top in logprobs["top_logprobs"]]


def answer_position(text: str) -> int | None:
    """Where the answer starts in a generated text: inside `{"answer": "` for JSON, else at
    its first non-space character."""
    found = _ANSWER_START.search(text)
    if found:
        return found.end()
    stripped = len(text) - len(text.lstrip())
    return stripped if stripped < len(text) else None


def yes_no_score(tokens: list[str], alternatives: list[dict[str, float]]) -> float | None:
    """log p(Yes) - log p(No) at the token holding the answer's first character (each summed
    over the alternatives that spell it: "Yes", " yes", '"Y', ...). An answer missing from the
    alternatives is taken at the least likely one listed (an upper bound on its probability).
    None when the text has no answer or neither word is listed there."""
    start = answer_position("".join(tokens))
    if start is None:
        return None
    offset = 0
    for token, top in zip(tokens, alternatives):
        if offset + len(token) > start:
            return _score(top)
        offset += len(token)
    return None


def _score(top: dict[str, float]) -> float | None:
    sums = {word: [lp for text, lp in top.items() if _spells(text, word)] for word in WORDS}
    if not any(sums.values()) or not top:
        return None
    floor = min(top.values())
    yes, no = (_logsumexp(sums[word]) if sums[word] else floor for word in WORDS)
    return yes - no


def _spells(text: str, word: str) -> bool:
    """Whether a token's text starts `word` ("Y", "yes", ' "Yes') or is `word` and then
    punctuation ("Yes."), ignoring case, spaces and quotes; "Not" and "Noah" are not "no"."""
    bare = text.strip().strip("\"'").strip().lower()
    return bool(bare) and (word.startswith(bare) or re.match(rf"{word}\b", bare) is not None)


def _logsumexp(values: list[float]) -> float:
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


def best_threshold(scores: list[float], labels: list[str]) -> float:
    """The threshold t ("Yes" when score > t) with the best F1 of "Yes" on these labeled
    scores: a midpoint between two of them, or below them all. Among equally good ones, the
    nearest to 0, the uncalibrated rule (Yes when p(Yes) > p(No))."""
    cuts = sorted(set(scores))
    candidates = [cuts[0] - 1.0] + [(a + b) / 2 for a, b in zip(cuts, cuts[1:])] + [cuts[-1]]
    return max(candidates, key=lambda t: (_f1(scores, labels, t), -abs(t)))


def _f1(scores: list[float], labels: list[str], threshold: float) -> float:
    tp = sum(1 for s, y in zip(scores, labels) if s > threshold and y == "Yes")
    predicted = sum(1 for s in scores if s > threshold)
    actual = sum(1 for y in labels if y == "Yes")
    return 2 * tp / (predicted + actual) if predicted + actual else 0.0


def auc(scores: list[float], labels: list[str]) -> float | None:
    """The chance a random "Yes" row scores above a random "No" row (ties count half): how
    well the scores rank, whatever the threshold (Mann-Whitney, by ranks). None without
    both labels."""
    order = sorted(range(len(scores)), key=scores.__getitem__)
    ranks, i = [0.0] * len(scores), 0
    while i < len(order):  # tied scores share their mean rank
        j = i
        while j + 1 < len(order) and scores[order[j + 1]] == scores[order[i]]:
            j += 1
        for k in order[i:j + 1]:
            ranks[k] = (i + j) / 2 + 1
        i = j + 1
    yes = [r for r, y in zip(ranks, labels) if y == "Yes"]
    n_no = len(scores) - len(yes)
    if not yes or not n_no:
        return None
    return (sum(yes) - len(yes) * (len(yes) + 1) / 2) / (len(yes) * n_no)
