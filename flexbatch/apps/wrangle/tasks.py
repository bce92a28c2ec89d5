"""The three wrangling tasks of Narayan et al. (2022), "Can Foundation Models Wrangle Your
Data?": entity matching, error detection and data imputation, each as a prompt template over
rows serialized `attr: value. attr: value`, an answer schema, and an answer parser.
"""
from __future__ import annotations

import json
import math
import random
import re
from dataclasses import dataclass, field

from ...errors import ConfigError

YES_NO = {"type": "object", "properties": {"answer": {"enum": ["Yes", "No"]}}, "required": ["answer"],
          "additionalProperties": False}
VALUE = {"type": "object", "properties": {"answer": {"type": "string", "maxLength": 80}}, "required": ["answer"],
         "additionalProperties": False}


@dataclass
class Item:
    """One question: `fields` fill the task's template; `label` is the known answer, if any
    ("Yes"/"No" for match and detect, the value for impute)."""

    id: str
    fields: dict[str, str]
    label: str | None = None


@dataclass(frozen=True)
class Task:
    name: str
    instruction: str
    template: str  # str.format over an item's fields
    schema: dict
    binary: bool  # Yes/No answers, scored with precision/recall/F1 (else accuracy)
    placeholders: tuple[str, ...] = field(default_factory=tuple)

    def with_template(self, template: str | None) -> "Task":
        if template is None:
            return self
        missing = [p for p in self.placeholders if "{" + p + "}" not in template]
        if missing:
            raise ConfigError(f"the {self.name} template must contain {', '.join('{' + p + '}' for p in missing)}; "
                              f"the default is: {self.template!r}")
        return Task(self.name, self.instruction, template, self.schema, self.binary, self.placeholders)

    def question(self, item: Item) -> str:
        try:
            return self.template.format(**item.fields)
        except (KeyError, IndexError, ValueError) as e:
            raise ConfigError(f"the {self.name} template does not fit item {item.id}: {e}") from None

    def prompt(self, item: Item, examples: list[Item], json_answers: bool) -> str:
        """Instruction, then each example's question and answer, then the item's question."""
        parts = [self.instruction]
        for ex in examples:
            parts.append(f"{self.question(ex)} {format_answer(ex.label, json_answers)}")
        parts.append(self.question(item))
        return "\n\n".join(parts)

    def parse(self, text: str | None) -> str | None:
        """The answer in a generated text (JSON `{"answer": ...}` or free text); None if none."""
        answer = answer_text(text)
        if answer is None or not self.binary:
            return answer
        word = re.match(r"\W*(\w+)", answer)
        word = word.group(1).lower() if word else ""
        return "Yes" if word in ("yes", "true") else "No" if word in ("no", "false") else None


def format_answer(label: str, json_answers: bool) -> str:
    # Compact, as the grammar makes the model write it: examples show exactly the answer's form.
    return json.dumps({"answer": label}, separators=(",", ":")) if json_answers else label


def answer_text(text: str | None) -> str | None:
    if text is None:
        return None
    stripped = text.strip()
    if stripped.startswith("{"):
        try:
            value = json.loads(stripped)
        except json.JSONDecodeError:
            value = None
        if isinstance(value, dict) and isinstance(value.get("answer"), str):
            return value["answer"].strip()
    first = stripped.splitlines()[0].strip() if stripped else ""
    return first or None


TASKS = {
    "match": Task("match", "Decide whether two records describe the same entity.",
                  "Record A is {left}. Record B is {right}. Are Record A and Record B the same? Answer:",
                  YES_NO, True, ("left", "right")),
    "detect": Task("detect", "Decide whether the value of an attribute in a record is an error.",
                   "{row}. Is there an error in {column}: {value}? Answer:", YES_NO, True,
                   ("row", "column", "value")),
    "impute": Task("impute", "Fill in the missing attribute of a record.",
                   "{row}. {column}?", VALUE, False, ("row", "column")),
}


def serialize(record: dict[str, str], skip: tuple[str, ...] = ()) -> str:
    """A row as `attr: value. attr: value` (the paper's serialization); empty values are kept
    as empty, so the model sees the attribute is missing."""
    return ". ".join(f"{k}: {_clean(v)}" for k, v in record.items() if k not in skip)


def _clean(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    text = str(value).strip()
    return text[:-2] if re.fullmatch(r"-?\d+\.0", text) else text  # 2003.0 from a float column -> 2003


def choose_examples(pool: list[Item], k: int, seed: int | None) -> list[Item]:
    """k labeled examples from `pool` (never the evaluated rows): with a seed, a random sample;
    without, the first ones in pool order taking answers in turn (Yes, No, Yes, ...) so a
    pool that starts with many non-matches still shows both answers."""
    labeled = [item for item in pool if item.label is not None]
    if k > len(labeled):
        raise ConfigError(f"--shots {k} needs {k} labeled examples, but the example pool has {len(labeled)}; "
                          "lower --shots or enlarge --pool")
    if seed is not None:
        return random.Random(seed).sample(labeled, k)
    by_answer: dict[str, list[Item]] = {}
    for item in labeled:
        by_answer.setdefault(item.label, []).append(item)
    queues = sorted(by_answer.values(), key=lambda q: labeled.index(q[0]))
    if len(queues) == 2 and {q[0].label for q in queues} == {"Yes", "No"}:
        queues.sort(key=lambda q: q[0].label != "Yes")
    chosen = []
    while len(chosen) < k:
        for queue in queues:
            if queue and len(chosen) < k:
                chosen.append(queue.pop(0))
    return chosen
