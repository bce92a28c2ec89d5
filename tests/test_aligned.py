"""The engine's I/O buffers: page-aligned, private, and on huge pages from 2 MiB up, as the
kernel reports them in /proc/self/smaps."""
from pathlib import Path

import pytest
import torch

from flexbatch.storage.aligned import ALIGN, HUGE_PAGE, aligned_bytes
from flexbatch.storage.disk import DiskFile

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def mapping_of(address: int) -> dict[str, int]:
    """The smaps fields (kB) of the mapping holding `address`."""
    fields, inside = {}, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:
            lo, hi = (int(v, 16) for v in head.split("-"))
            inside = lo <= address < hi
        elif inside and line.split()[-1] == "kB":
            fields[head.rstrip(":")] = int(line.split()[1])
    return fields


def test_a_large_buffer_starts_on_a_huge_page_and_the_kernel_backs_it_with_huge_pages():
    if not THP.exists() or "[never]" in THP.read_text():
        pytest.skip("transparent huge pages are off on this kernel")
    buf = aligned_bytes(3 * HUGE_PAGE + 5)
    assert buf.numel() >= 3 * HUGE_PAGE + 5 and buf.data_ptr() % HUGE_PAGE == 0
    buf.fill_(1)
    smaps = mapping_of(buf.data_ptr())
    # private anonymous memory (Python's default mapping is shared, which is shmem and never
    # huge under the usual shmem_enabled=never), and most of it in huge pages
    assert smaps["Shared_Clean"] + smaps["Shared_Dirty"] == 0
    assert smaps["AnonHugePages"] * 1024 >= 3 * HUGE_PAGE, smaps


def test_small_and_large_buffers_round_trip_through_o_direct(tmp_path):
    for nbytes in (ALIGN + 3, HUGE_PAGE + ALIGN):
        out, back = aligned_bytes(nbytes), aligned_bytes(nbytes)
        assert out.data_ptr() % ALIGN == 0 and back.data_ptr() % ALIGN == 0
        data = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=torch.Generator().manual_seed(nbytes))
        out[:nbytes] = data
        file = DiskFile(tmp_path / f"probe{nbytes}", nbytes)
        file.write_from(out, 0, nbytes)
        file.read_into(back, 0, nbytes)
        file.close()
        assert torch.equal(back[:nbytes], data)
