"""flexbatch's converted store: one raw file per tensor plus an index, read lazily.

Layout of a store folder:
    config.json        Hugging Face style config (written from the source's metadata)
    flexbatch.json     index: format version and, per tensor, file, shape, dtype, bytes, crc32
    tensors/<name>.bin raw little-endian tensor bytes, nothing else (so later offloading can
                       read them with O_DIRECT into aligned buffers)
    tokenizer files    as written by the tokenizer's save_pretrained
A store is written to a temporary folder and renamed into place, so a crash never leaves a
half-written store that looks complete.
"""
from __future__ import annotations

import json
import os
import shutil
import zlib
from pathlib import Path

import torch

from ..errors import ModelFormatError, WeightFileError
from ..models.spec import config_from_hf_dict
from .source import OpenedModel

STORE_INDEX = "flexbatch.json"
STORE_FORMAT = "flexbatch-store"
STORE_VERSION = 1
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "int8": torch.int8, "uint8": torch.uint8, "int32": torch.int32, "int64": torch.int64}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def tensor_bytes(t: torch.Tensor) -> bytes:
    flat = t.detach().contiguous().cpu().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes()


class StoreSource:
    """Reads tensors from a store; each tensor's checksum is verified on its first read."""

    def __init__(self, folder: Path, index: dict):
        self.folder = folder
        self._entries = index["tensors"]
        self._verified: set[str] = set()

    def names(self) -> set[str]:
        return set(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name]["shape"])

    def entry(self, name: str) -> dict:
        return self._entries[name]

    def path_of(self, name: str) -> Path:
        return self.folder / self._entries[name]["file"]

    def read(self, name: str) -> torch.Tensor:
        entry = self._entries[name]
        path = self.path_of(name)
        buf = bytearray(entry["nbytes"])
        try:
            with open(path, "rb") as f:
                got = f.readinto(buf)
        except OSError as e:
            raise WeightFileError(f"cannot read {path}: {e}") from e
        if got != entry["nbytes"] or os.path.getsize(path) != entry["nbytes"]:
            raise WeightFileError(
                f"{path} holds {os.path.getsize(path)} bytes but the index expects {entry['nbytes']}: "
                f"the file is truncated or was replaced. Re-run `flexbatch convert` for this model."
            )
        if name not in self._verified:
            if zlib.crc32(buf) != entry["crc32"]:
                raise WeightFileError(
                    f"checksum mismatch in {path} (tensor {name}): the file is corrupted. "
                    "Re-run `flexbatch convert` for this model."
                )
            self._verified.add(name)
        tensor = torch.frombuffer(buf, dtype=DTYPES[entry["dtype"]]) if buf else torch.empty(0)
        return tensor.reshape(entry["shape"])


def open_store(folder: Path) -> OpenedModel:
    try:
        index = json.loads((folder / STORE_INDEX).read_text())
    except json.JSONDecodeError as e:
        raise ModelFormatError(f"{folder / STORE_INDEX} is not valid JSON: {e}") from e
    if index.get("format") != STORE_FORMAT or index.get("version") != STORE_VERSION:
        raise ModelFormatError(
            f"{folder} was written by an incompatible flexbatch version "
            f"(format {index.get('format')!r} v{index.get('version')}); re-run `flexbatch convert`."
        )
    raw = json.loads((folder / "config.json").read_text())
    config = config_from_hf_dict(raw, source=str(folder / "config.json"))
    return OpenedModel(config, StoreSource(folder, index), folder, "store", raw)


def _safe_file_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name) + ".bin"


def write_store(model: OpenedModel, dst: Path, dtype: torch.dtype | None = None,
                progress=None, exist_ok: bool = False) -> Path:
    """Convert `model` into a store at `dst`; float tensors are cast to `dtype` if given.

    With exist_ok, a store that another process finished first is kept and reused.
    """
    dst = Path(dst).expanduser()
    if dst.exists():
        if exist_ok:
            return dst
        raise ModelFormatError(f"{dst} already exists; choose a new destination or delete it first.")
    tmp = dst.with_name(f"{dst.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "tensors").mkdir(parents=True)
    entries = {}
    for name in sorted(model.source.names()):
        tensor = model.source.read(name)
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        data = tensor_bytes(tensor)
        file = "tensors/" + _safe_file_name(name)
        (tmp / file).write_bytes(data)
        entries[name] = {"file": file, "shape": list(tensor.shape), "dtype": dtype_name(tensor.dtype),
                         "nbytes": len(data), "crc32": zlib.crc32(data)}
        if progress is not None:
            progress(name, len(data))
    index = {"format": STORE_FORMAT, "version": STORE_VERSION, "source": str(model.path), "tensors": entries}
    (tmp / STORE_INDEX).write_text(json.dumps(index, indent=1))
    (tmp / "config.json").write_text(json.dumps(model.hf_config, indent=2))
    _save_tokenizer(model, tmp)
    try:
        os.replace(tmp, dst)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (exist_ok and dst.exists()):
            raise
    return dst


def _save_tokenizer(model: OpenedModel, folder: Path) -> None:
    tokenizer = model.load_tokenizer()
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
