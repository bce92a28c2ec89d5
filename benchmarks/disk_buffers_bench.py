"""O_DIRECT reads into the engine's buffers (huge pages) against buffers of 4 KiB pages.

The disk copies each request straight into the destination's physical pages. On a virtual
disk a 4 MiB request into scattered 4 KiB pages is a list of hundreds of segments, which the
device may take in several pieces; into 2 MiB huge pages it is two. This writes a file to
--folder, then reads it again and again as the offloading engine reads weights (4 MiB
requests, 4 in flight) into a pool of 16 buffers of each kind, alternating kinds so drift in
the disk's speed hits both alike. The 4 KiB pages are scattered in physical memory on
purpose, as a long-lived process's are (`small_page_buffers`).

    .venv/bin/python benchmarks/disk_buffers_bench.py --folder ~/.cache/flexbatch

The last line printed is one JSON object: each kind's rates, and the ratio of their medians.
"""
from __future__ import annotations

import argparse
import json
import mmap
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flexbatch.storage.aligned import aligned_bytes  # noqa: E402

REQUEST = 4 << 20
POOL = 16


def small_page_buffers(count: int, nbytes: int) -> list[memoryview]:
    """What `aligned_bytes` returned before: shared anonymous mappings, never huge pages
    unless the kernel's shmem_enabled says so. Their pages are touched in turn with those of
    a mapping thrown away after, so each buffer's pages are scattered in physical memory, as
    a long-lived process's are; freshly touched pages of a fresh process often lie in order,
    and read as fast as huge pages."""
    buffers, spare = [mmap.mmap(-1, nbytes) for _ in range(count)], mmap.mmap(-1, count * nbytes)
    for page in range(0, nbytes, mmap.PAGESIZE):
        for i, buf in enumerate(buffers):
            buf[page] = 1
            spare[i * nbytes + page] = 1
    spare.close()
    return [memoryview(buf) for buf in buffers]


def read_rate(fd: int, size: int, buffers: list[memoryview]) -> float:
    with ThreadPoolExecutor(4) as pool:
        start = time.perf_counter()
        list(pool.map(lambda i: os.preadv(fd, [buffers[i % len(buffers)]], i * REQUEST), range(size // REQUEST)))
        return size / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--folder", default=str(Path.home() / ".cache" / "flexbatch"), help="a folder on the disk to test")
    p.add_argument("--size", type=int, default=2048, help="MiB read per pass")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    size = args.size << 20
    path = Path(args.folder) / "flexbatch-buffers-probe"
    kinds = {"huge_pages": [memoryview(aligned_bytes(REQUEST).numpy()) for _ in range(POOL)],
             "small_pages": small_page_buffers(POOL, REQUEST)}
    for buffers in kinds.values():
        for buf in buffers:
            buf[:] = b"\1" * REQUEST  # touched, as the engine's pools are after their first use
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_DIRECT)
    try:
        for offset in range(0, size, REQUEST):
            os.pwritev(fd, [kinds["huge_pages"][0]], offset)
        os.fsync(fd)
        rates = {name: [] for name in kinds}
        for _ in range(args.rounds):
            for name, buffers in kinds.items():
                rates[name].append(read_rate(fd, size, buffers))
            print("  ".join(f"{name} {r[-1] / 1e9:.2f} GB/s" for name, r in rates.items()), flush=True)
    finally:
        os.close(fd)
        path.unlink(missing_ok=True)
    medians = {name: statistics.median(r) for name, r in rates.items()}
    print(json.dumps({"request_bytes": REQUEST, "in_flight": 4, "pass_bytes": size,
                      "rates_Bps": rates, "median_Bps": medians,
                      "ratio_huge_over_small": medians["huge_pages"] / medians["small_pages"]}))


if __name__ == "__main__":
    main()
