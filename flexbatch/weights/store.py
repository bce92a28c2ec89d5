"""flexbatch's converted store: one raw file per tensor plus an index, read lazily.

Layout of a store folder:
    config.json        Hugging Face style config (written from the source's metadata)
    flexbatch.json     index: format version and, per tensor, file, shape, dtype, bytes, crc32
    tensors/<name>.bin raw little-endian tensor bytes, nothing else (so later offloading can
                       read them with O_DIRECT into aligned buffers)
With `convert --compress-weight`, each packable layer weight is stored as a `PackedLinear`:
its index entry keeps the logical shape and dtype and adds "packed": {bits, group, layout,
parts}, where parts describes the files of the packed levels and the scales, each with its
own shape, dtype, bytes and crc32. Readers that want dense tensors get them dequantized.
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
from ..kernels.packed import PackedLinear, dequantize_linear, pack_linear, packable
from ..kernels.quant import QuantConfig
from ..models.spec import config_from_hf_dict
from .source import OpenedModel

STORE_INDEX = "flexbatch.json"
STORE_FORMAT = "flexbatch-store"
STORE_VERSION = 1
PACKED_LAYOUT = {4: "int4-cpu-tile64", 8: "uint8-rows"}  # see kernels/packed.py
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

    def read(self, name: str) -> torch.Tensor:
        """The tensor, dense (a packed weight is dequantized)."""
        packed = self.read_packed(name)
        if packed is not None:
            return dequantize_linear(packed)
        return self._read_file(name, self._entries[name])

    def read_packed(self, name: str) -> PackedLinear | None:
        """The stored PackedLinear of a weight written compressed, else None."""
        info = self._entries[name].get("packed")
        if info is None:
            return None
        parts = {part: self._read_file(f"{name}#{part}", entry) for part, entry in info["parts"].items()}
        return PackedLinear(parts["data"], parts["scale_zero"], info["bits"], info["group"])

    def quant_grid(self, name: str) -> int | None:
        """The grid the tensor's values lie on: the group of a weight stored compressed, else
        the source's when converted from a quantized file, else None."""
        entry = self._entries[name]
        return entry["packed"]["group"] if "packed" in entry else entry.get("grid")

    def packing(self, name: str) -> tuple[int, int] | None:
        """(bits, group) of a weight stored compressed, else None."""
        info = self._entries[name].get("packed")
        return None if info is None else (info["bits"], info["group"])

    def _read_file(self, name: str, entry: dict) -> torch.Tensor:
        path = self.folder / entry["file"]
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
                progress=None, exist_ok: bool = False, quant: QuantConfig | None = None) -> Path:
    """Convert `model` into a store at `dst`; float tensors are cast to `dtype` if given.
    With `quant`, layer weights that can be packed are stored compressed (see the module doc).

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
    packable_names = _layer_weight_names(model) if quant is not None else set()
    for name in sorted(model.source.names()):
        tensor = model.source.read(name)
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        if name in packable_names and packable(tuple(tensor.shape), quant.bits, quant.group_size):
            packed = pack_linear(tensor, quant.bits, quant.group_size)
            parts = {part: _write_file(tmp, f"{name}#{part}", getattr(packed, part))
                     for part in ("data", "scale_zero")}
            entries[name] = {"shape": list(tensor.shape), "dtype": dtype_name(tensor.dtype),
                             "packed": {"bits": quant.bits, "group": quant.group_size,
                                        "layout": PACKED_LAYOUT[quant.bits], "parts": parts}}
        else:
            entries[name] = _write_file(tmp, name, tensor)
        grid = getattr(model.source, "quant_grid", lambda _: None)(name)
        if grid:  # dense now, but quantized on this grid at the source: compression follows it
            entries[name]["grid"] = grid
        if progress is not None:
            progress(name, tensor.numel() * tensor.element_size())
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


def _write_file(folder: Path, name: str, tensor: torch.Tensor) -> dict:
    data = tensor_bytes(tensor)
    file = "tensors/" + _safe_file_name(name)
    (folder / file).write_bytes(data)
    return {"file": file, "shape": list(tensor.shape), "dtype": dtype_name(tensor.dtype),
            "nbytes": len(data), "crc32": zlib.crc32(data)}


def _layer_weight_names(model: OpenedModel) -> set[str]:
    """Source names of the transformer layers' 2-D weights (embeddings and head stay dense)."""
    from ..models import get_family
    from .loader import resolve_names

    family = get_family(model.config)
    mapping = resolve_names(model.config, family, model.source)
    return {mapping[family.layer_prefix(j) + spec.name] for j in range(model.config.num_layers)
            for spec in family.layer_specs(model.config) if len(spec.shape) == 2}


def _save_tokenizer(model: OpenedModel, folder: Path) -> None:
    tokenizer = model.load_tokenizer()
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
