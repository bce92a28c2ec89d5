"""Model weights kept on their tiers, and loading one layer's weights for compute.

Global tensors (embeddings, final norm, head) stay in memory. Each layer's tensors are
placed on the device, host or disk by `place_by_fraction`; the disk-resident ones of a layer
are written into one file of the offload folder at block-aligned offsets, so a layer load is
one large O_DIRECT read into a reusable slot buffer. With compressed weights, every 2-D layer
weight is stored, placed, moved and read as a `PackedLinear` (its packed levels and scales),
so disk traffic and resident bytes shrink with it.
"""
from __future__ import annotations

import math
import queue
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..config import Policy
from ..kernels import KernelChoice
from ..kernels.packed import PackedLinear, element_size, pack_linear, packable, stored_bytes, stored_parts
from ..models.family import Family
from ..models.spec import ModelConfig
from ..storage.aligned import align_up, aligned_bytes, as_dtype
from ..storage.disk import DiskFile, Traffic
from ..storage.placement import place_by_fraction
from ..storage.tiers import Tier
from ..weights.loader import resolve_names
from ..weights.source import TensorSource

READ_CHUNK = 4 << 20  # O_DIRECT reads in 4 MiB requests, several in flight
READ_SLOTS = 2  # layers read from disk at once: the one computing and the one loading next

Part = tuple[int, tuple[int, ...], torch.dtype]  # byte offset, shape, dtype


@dataclass
class DiskLayer:
    file: DiskFile
    entries: dict[str, dict[str, Part]]  # tensor name -> its stored parts
    nbytes: int


@dataclass
class LayerLoad:
    """One layer's weights on the compute device, and the read slot their disk-resident
    tensors are views into (None when none are on disk): give it back with `release`."""

    layer: int
    weights: dict[str, torch.Tensor | PackedLinear]
    slot: torch.Tensor | None = None


class _Globals(Mapping):
    """The model's global tensors (embeddings, final norm, head), each read when first used:
    a pipeline stage holds only those its layers' end of the model uses (the first stage the
    embeddings, the last the head). Tied tensors are read once."""

    def __init__(self, specs, aliases: dict[str, str], read):
        self._names, self._aliases, self._read = [s.name for s in specs], aliases, read
        self._loaded: dict[str, torch.Tensor] = {}

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._names:
            raise KeyError(name)
        key = self._aliases.get(name, name)
        if key not in self._loaded:
            self._loaded[key] = self._read(name)
        return self._loaded[key]

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def load_all(self) -> None:
        for name in self._names:
            self[name]

    def held(self) -> list[str]:
        """The names whose tensors are read (an alias and its target count once)."""
        return [n for n in self._names if self._aliases.get(n, n) in self._loaded]


def weight_fractions(policy: Policy) -> dict[Tier, float]:
    return {Tier.DEVICE: policy.weights_device, Tier.HOST: policy.weights_host, Tier.DISK: policy.weights_disk}


class WeightHome:
    """The weights of the model's layers `layers` (all by default; a pipeline stage holds a
    range of them), indexed from 0 in that range: load(0) is layer layers[0]."""

    def __init__(self, cfg: ModelConfig, family: Family, source: TensorSource, policy: Policy,
                 dtype: torch.dtype, device: torch.device, offload_dir: Path, kernels: KernelChoice = KernelChoice(),
                 layers: range | None = None):
        self.cfg, self.family, self.dtype, self.device = cfg, family, dtype, device
        self.layers = layers if layers is not None else range(cfg.num_layers)
        self.quant = policy.weight_quant
        self.kernels = kernels  # carried by every packed weight to the matmul
        self.traffic = Traffic()  # disk reads of layer loads, for bandwidth reports
        mapping = resolve_names(cfg, family, source)
        self.tiers = self._place(policy)
        read = lambda name: source.read(mapping[name]).to(dtype)
        self._source, self._mapping = source, mapping
        self.globals = _Globals(family.global_specs(cfg), family.tied_aliases(cfg),
                                lambda name: _resident(read(name), device))
        if len(self.layers) == cfg.num_layers:
            self.globals.load_all()  # the whole model uses all of them: read now, not in its first step
        self.memory: list[dict[str, torch.Tensor | PackedLinear]] = []
        self.disk: list[DiskLayer | None] = []
        offload_dir.mkdir(parents=True, exist_ok=True)
        for j in self.layers:
            self._home_layer(j, read, offload_dir, policy)
        slot_bytes = max((d.nbytes for d in self.disk if d is not None), default=0)
        # pinned on a GPU machine, so the copy from a slot to the GPU runs at full speed
        self._free_slots: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(READ_SLOTS if slot_bytes else 0):
            self._free_slots.put(aligned_bytes(slot_bytes, pinned=device.type == "cuda"))
        self._readers = ThreadPoolExecutor(max_workers=4, thread_name_prefix="flexbatch-read")

    def _spec_bytes(self, spec) -> int:
        return stored_bytes(spec.shape, self.dtype, self.quant)

    def _place(self, policy: Policy) -> list[dict[str, Tier]]:
        specs = self.family.layer_specs(self.cfg)
        sizes = [self._spec_bytes(s) for _ in self.layers for s in specs]
        flat = place_by_fraction(sizes, weight_fractions(policy))
        n = len(specs)
        return [{s.name: flat[j * n + i] for i, s in enumerate(specs)} for j in range(len(self.layers))]

    def _stored(self, name: str, read) -> torch.Tensor | PackedLinear:
        """A layer tensor in its stored form: packed when compression applies to it, taken
        as is from a store converted with the same compression."""
        shape = tuple(self._source.shape(self._mapping[name]))
        if self.quant is None or not packable(shape, self.quant.bits, self.quant.group_size):
            return read(name)
        bits, group = self.quant.bits, self.quant.group_size
        provider = self._mapping[name]
        if getattr(self._source, "packing", lambda _: None)(provider) == (bits, group):
            packed = self._source.read_packed(provider)
            return PackedLinear(packed.data, packed.scale_zero.to(self.dtype), bits, group, self.kernels)
        return pack_linear(read(name), bits, group, self.kernels)

    def _home_layer(self, j: int, read, offload_dir: Path, policy: Policy) -> None:
        prefix = self.family.layer_prefix(j)
        memory, entries, offset = {}, {}, 0
        for spec in self.family.layer_specs(self.cfg):
            tier = self.tiers[j - self.layers.start][spec.name]
            if tier is Tier.DISK:
                entries[spec.name] = {}
                for part, (shape, dtype) in stored_parts(spec.shape, self.dtype, self.quant).items():
                    entries[spec.name][part] = (offset, shape, dtype)
                    offset = align_up(offset + math.prod(shape) * element_size(dtype))
            else:
                home = self.device if tier is Tier.DEVICE else torch.device("cpu")
                stored = _resident(self._stored(prefix + spec.name, read), home)
                if home.type == "cpu" and self.device.type == "cuda" and policy.pin_weights:
                    stored = _pinned(stored)
                memory[spec.name] = stored
        self.memory.append(memory)
        self.disk.append(self._write_layer_file(j, read, prefix, entries, offset, offload_dir) if entries else None)

    def _write_layer_file(self, j, read, prefix, entries, nbytes, offload_dir) -> DiskLayer:
        buf = aligned_bytes(nbytes)
        for name, parts in entries.items():
            stored = self._stored(prefix + name, read)
            for part, (offset, shape, dtype) in parts.items():
                value = getattr(stored, part) if part else stored
                as_dtype(buf, dtype, shape, offset).copy_(value)
        file = DiskFile(offload_dir / f"layer{j:04d}.weights", nbytes)
        file.write_from(buf, 0, nbytes)
        file.traffic = self.traffic  # counted from here on: loads, not the file's creation
        return DiskLayer(file, entries, nbytes)

    def tier_bytes(self) -> dict[Tier, int]:
        """Stored bytes of layer weights on each tier (global tensors are always in memory)."""
        out = {t: 0 for t in Tier}
        for layer in self.tiers:
            for spec in self.family.layer_specs(self.cfg):
                out[layer[spec.name]] += self._spec_bytes(spec)
        return out

    def load(self, j: int) -> LayerLoad:
        """Layer layers[j]'s weights on the compute device. Disk-resident tensors are read into a free
        slot (waiting for one if READ_SLOTS loads are still held) and may be views into it,
        valid until the load is released."""
        weights = {name: _to(t, self.device) for name, t in self.memory[j].items()}
        disk = self.disk[j]
        if disk is None:
            return LayerLoad(j, weights)
        slot = self._free_slots.get()
        try:
            chunks = [(s, min(s + READ_CHUNK, disk.nbytes)) for s in range(0, disk.nbytes, READ_CHUNK)]
            for future in [self._readers.submit(disk.file.read_into, slot, a, b) for a, b in chunks]:
                future.result()
        except BaseException:
            self._free_slots.put(slot)
            raise
        for name, parts in disk.entries.items():
            views = {part: as_dtype(slot, dtype, shape, offset) for part, (offset, shape, dtype) in parts.items()}
            stored = views[""] if "" in views else PackedLinear(**views, bits=self.quant.bits,
                                                                 group=self.quant.group_size, choice=self.kernels)
            weights[name] = _to(stored, self.device)
        return LayerLoad(j, weights, slot)

    def release(self, load: LayerLoad) -> None:
        """Done with `load`'s weights: its read slot may take the next layer."""
        if load.slot is not None:
            self._free_slots.put(load.slot)
            load.slot = None

    def close(self) -> None:
        self._readers.shutdown(wait=True)
        for d in self.disk:
            if d is not None:
                d.file.close()


def _to(stored: torch.Tensor | PackedLinear, device: torch.device) -> torch.Tensor | PackedLinear:
    """Move to `device`; a PackedLinear always comes back as a new object, so the dense copy
    it may cache for large batches lives only as long as this load's weights."""
    if isinstance(stored, PackedLinear):
        return stored.to(device)
    return stored.to(device, non_blocking=True)


def _resident(stored: torch.Tensor | PackedLinear, device: torch.device) -> torch.Tensor | PackedLinear:
    """`stored` on `device`, in memory of its own. A tensor read from a model file may be a
    view of the file's pages (safetensors maps it): under memory pressure the kernel drops
    those and reads them back 4 KiB at a time on every use, where the planner counted them
    as held in memory."""
    moved = _to(stored, device)
    if device.type != "cpu":
        return moved
    if isinstance(moved, PackedLinear):
        return replace(moved, data=moved.data.clone(), scale_zero=moved.scale_zero.clone(), _dense=None)
    return moved.clone()


def _pinned(stored: torch.Tensor | PackedLinear) -> torch.Tensor | PackedLinear:
    return stored.pin_memory()
