"""Reading the wrangling tasks' CSV tables into questions (`Item`s).

    match   LEFT.csv and RIGHT.csv (records with an id column) + PAIRS.csv (left id, right id
            in its first two columns, optional `label` column: 1/0, yes/no, true/false)
    detect  TABLE.csv, the --column to check and a label column (1 = the value is an error)
    impute  TABLE.csv and the --column to fill: rows where it is empty are filled, rows where it
            is known are the labeled ones (examples, and evaluation with its value hidden)
"""
from __future__ import annotations

import csv
from pathlib import Path

from ...errors import ConfigError
from .tasks import Item, serialize

TRUE = {"1", "1.0", "yes", "true", "y", "t"}
FALSE = {"0", "0.0", "no", "false", "n", "f"}


def read_csv(path: str | Path) -> list[dict[str, str]]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path} does not exist; give a CSV file with a header row")
    with path.open(newline="", encoding="utf-8-sig") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ConfigError(f"{path} has no data rows (a header row, then one row per record)")
    return rows


def yes_no(value: str | None, where: str) -> str | None:
    if value is None or value.strip() == "":
        return None
    v = value.strip().lower()
    if v in TRUE:
        return "Yes"
    if v in FALSE:
        return "No"
    raise ConfigError(f"{where}: label {value!r} is not one of 1/0, yes/no, true/false")


def _require(rows: list[dict], column: str, path, flag: str) -> None:
    if column not in rows[0]:
        raise ConfigError(f"{path} has no column {column!r} ({flag}); its columns: {', '.join(rows[0])}")


def match_items(left_path, right_path, pairs_path, id_column: str = "id", label_column: str = "label") -> list[Item]:
    left, right, pairs = read_csv(left_path), read_csv(right_path), read_csv(pairs_path)
    for rows, path in ((left, left_path), (right, right_path)):
        _require(rows, id_column, path, "--id-column")
    by_id = [{r[id_column]: r for r in rows} for rows in (left, right)]
    columns = list(pairs[0])
    if len(columns) < 2:
        raise ConfigError(f"{pairs_path} needs the left and right ids in its first two columns")
    items = []
    for n, pair in enumerate(pairs):
        ids = pair[columns[0]], pair[columns[1]]
        records = [table.get(i) for table, i in zip(by_id, ids)]
        for side, record, i in zip(("left", "right"), records, ids):
            if record is None:
                raise ConfigError(f"{pairs_path} row {n + 2}: no {side} record with {id_column} {i!r}")
        fields = {"left": serialize(records[0], (id_column,)), "right": serialize(records[1], (id_column,))}
        label = yes_no(pair.get(label_column), f"{pairs_path} row {n + 2}")
        items.append(Item(f"{ids[0]}|{ids[1]}", fields, label))
    return items


def detect_items(table_path, column: str, label_column: str = "is_error", id_column: str | None = None) -> list[Item]:
    rows = read_csv(table_path)
    _require(rows, column, table_path, "--column")
    items = []
    for n, row in enumerate(rows):
        label = yes_no(row.get(label_column), f"{table_path} row {n + 2}")
        record = {k: v for k, v in row.items() if k not in (label_column, id_column)}
        fields = {"row": serialize(record), "column": column, "value": record[column]}
        items.append(Item(row[id_column] if id_column else str(n), fields, label))
    return items


def impute_items(table_path, column: str, id_column: str | None = None) -> list[Item]:
    rows = read_csv(table_path)
    _require(rows, column, table_path, "--column")
    items = []
    for n, row in enumerate(rows):
        value = (row[column] or "").strip()
        fields = {"row": serialize(row, (column, id_column) if id_column else (column,)), "column": column}
        items.append(Item(row[id_column] if id_column else str(n), fields, value or None))
    return items


def split(items: list[Item], pool_size: int, limit: int | None) -> tuple[list[Item], list[Item]]:
    """(example pool, evaluated items): the first `pool_size` labeled items are examples only,
    never asked; every other item is asked (at most `limit`). Zero-shot and few-shot runs with
    the same pool size ask the same items."""
    labeled = [i for i in items if i.label is not None]
    pool = labeled[:pool_size]
    taken = {id(i) for i in pool}
    asked = [i for i in items if id(i) not in taken]
    return pool, asked[:limit] if limit is not None else asked
