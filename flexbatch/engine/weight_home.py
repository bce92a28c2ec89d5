"""Model weights kept on their tiers, and loading one layer's weights for compute.

Global tensors (embeddings, final norm, head) stay in memory. Each layer's tensors are
placed on the device, host or disk by `place_by_fraction`; the disk-resident ones of a layer
are written, in the compute dtype, into one file of the offload folder at block-aligned
offsets, so a layer load is one large O_DIRECT read into a reusable slot buffer.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import Policy
from ..models.family import Family
from ..models.spec import ModelConfig
from ..storage.aligned import align_up, aligned_bytes, as_dtype
from ..storage.disk import DiskFile
from ..storage.placement import place_by_fraction
from ..storage.tiers import Tier
from ..weights.loader import resolve_names
from ..weights.source import TensorSource

READ_CHUNK = 4 << 20  # O_DIRECT reads in 4 MiB requests, several in flight


@dataclass
class DiskLayer:
    file: DiskFile
    entries: dict[str, tuple[int, tuple[int, ...]]]  # name -> (byte offset, shape)
    nbytes: int


def weight_fractions(policy: Policy) -> dict[Tier, float]:
    return {Tier.DEVICE: policy.weights_device, Tier.HOST: policy.weights_host, Tier.DISK: policy.weights_disk}


class WeightHome:
    def __init__(self, cfg: ModelConfig, family: Family, source: TensorSource, policy: Policy,
                 dtype: torch.dtype, device: torch.device, offload_dir: Path):
        self.cfg, self.family, self.dtype, self.device = cfg, family, dtype, device
        mapping = resolve_names(cfg, family, source)
        self.element_size = torch.empty((), dtype=dtype).element_size()
        self.tiers = self._place(policy)
        read = lambda name: source.read(mapping[name]).to(dtype)
        self.globals = self._load_globals(read)
        self.memory: list[dict[str, torch.Tensor]] = []
        self.disk: list[DiskLayer | None] = []
        offload_dir.mkdir(parents=True, exist_ok=True)
        for j in range(cfg.num_layers):
            self._home_layer(j, read, offload_dir, policy)
        slot_bytes = max((d.nbytes for d in self.disk if d is not None), default=0)
        self.slots = [aligned_bytes(slot_bytes) for _ in range(2)] if slot_bytes else []
        self._readers = ThreadPoolExecutor(max_workers=4, thread_name_prefix="flexbatch-read")
        self.bytes_read = 0  # disk bytes read by `load`, for bandwidth reports

    def _place(self, policy: Policy) -> list[dict[str, Tier]]:
        specs = self.family.layer_specs(self.cfg)
        sizes = [s.numel() * self.element_size for _ in range(self.cfg.num_layers) for s in specs]
        flat = place_by_fraction(sizes, weight_fractions(policy))
        n = len(specs)
        return [{s.name: flat[j * n + i] for i, s in enumerate(specs)} for j in range(self.cfg.num_layers)]

    def _load_globals(self, read) -> dict[str, torch.Tensor]:
        loaded, out = {}, {}
        aliases = self.family.tied_aliases(self.cfg)
        for spec in self.family.global_specs(self.cfg):
            key = aliases.get(spec.name, spec.name)
            if key not in loaded:
                loaded[key] = read(spec.name).to(self.device)
            out[spec.name] = loaded[key]
        return out

    def _home_layer(self, j: int, read, offload_dir: Path, policy: Policy) -> None:
        prefix = self.family.layer_prefix(j)
        memory, entries, offset = {}, {}, 0
        for spec in self.family.layer_specs(self.cfg):
            tier = self.tiers[j][spec.name]
            if tier is Tier.DISK:
                entries[spec.name] = (offset, spec.shape)
                offset = align_up(offset + spec.numel() * self.element_size)
            else:
                tensor = read(prefix + spec.name)
                home = self.device if tier is Tier.DEVICE else torch.device("cpu")
                tensor = tensor.to(home)
                if home.type == "cpu" and self.device.type == "cuda" and policy.pin_weights:
                    tensor = tensor.pin_memory()
                memory[spec.name] = tensor
        self.memory.append(memory)
        self.disk.append(self._write_layer_file(j, read, prefix, entries, offset, offload_dir) if entries else None)

    def _write_layer_file(self, j, read, prefix, entries, nbytes, offload_dir) -> DiskLayer:
        buf = aligned_bytes(nbytes)
        for name, (offset, shape) in entries.items():
            as_dtype(buf, self.dtype, shape, offset).copy_(read(prefix + name))
        file = DiskFile(offload_dir / f"layer{j:04d}.weights", nbytes)
        file.write_from(buf, 0, nbytes)
        return DiskLayer(file, entries, nbytes)

    def disk_bytes(self) -> int:
        return sum(d.nbytes for d in self.disk if d is not None)

    def tier_bytes(self) -> dict[Tier, int]:
        """Bytes of layer weights on each tier (global tensors are always in memory)."""
        out = {t: 0 for t in Tier}
        for j, layer in enumerate(self.tiers):
            for spec in self.family.layer_specs(self.cfg):
                out[layer[spec.name]] += spec.numel() * self.element_size
        return out

    def load(self, j: int) -> dict[str, torch.Tensor]:
        """Layer j's weights on the compute device. Disk-resident tensors are views into slot
        j % 2, which stays valid until layer j + 2 is loaded."""
        weights = {name: t.to(self.device, non_blocking=True) for name, t in self.memory[j].items()}
        disk = self.disk[j]
        if disk is not None:
            slot = self.slots[j % 2]
            chunks = [(s, min(s + READ_CHUNK, disk.nbytes)) for s in range(0, disk.nbytes, READ_CHUNK)]
            for future in [self._readers.submit(disk.file.read_into, slot, a, b) for a, b in chunks]:
                future.result()
            self.bytes_read += disk.nbytes
            for name, (offset, shape) in disk.entries.items():
                weights[name] = as_dtype(slot, self.dtype, shape, offset).to(self.device, non_blocking=True)
        return weights

    def close(self) -> None:
        self._readers.shutdown(wait=True)
        for d in self.disk:
            if d is not None:
                d.file.close()
