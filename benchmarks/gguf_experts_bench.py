"""Reading one layer's experts from a merged GGUF expert tensor: flexbatch's per-expert slice of
the quantized blocks vs two ways of dequantizing the whole merged tensor, side by side on the
same file.

- slice (flexbatch): each expert read dequantizes only that expert's blocks.
- whole per read: each expert read dequantizes the merged tensor and keeps one slice (what a
  source without slicing does when the loader asks for experts one at a time).
- whole once: dequantize the merged tensor once and split it (transformers' GGUF loader);
  as fast as slicing in total, but holds every expert in float32 at once.

Reports seconds to read every expert and the peak numpy memory (tracemalloc) of each way.
Default shape: 8 experts of Qwen1.5-MoE-A2.7B's (1408 x 2048). Last line: one JSON object.

    python benchmarks/gguf_experts_bench.py --experts 8 --rows 1408 --cols 2048 --qtype Q4_0
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def write_merged(path: Path, experts: int, rows: int, cols: int, qtype) -> None:
    import numpy as np
    from gguf import GGUFWriter, quants

    array = np.random.default_rng(0).standard_normal((experts, rows, cols), dtype=np.float32)
    writer = GGUFWriter(str(path), "qwen2moe")
    writer.add_tensor("blk.0.ffn_gate_exps.weight", quants.quantize(array, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def measure(read_all) -> dict:
    tracemalloc.start()
    start = time.perf_counter()
    checksum = read_all()
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return {"seconds": seconds, "peak_mib": peak / 2**20, "checksum": checksum}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--rows", type=int, default=1408, help="each expert's output features")
    ap.add_argument("--cols", type=int, default=2048, help="each expert's input features (a multiple of 32)")
    ap.add_argument("--qtype", default="Q4_0", help="a gguf quantization type, e.g. Q4_0, Q8_0")
    args = ap.parse_args()

    from gguf import GGMLQuantizationType, GGUFReader, quants

    from flexbatch.weights.gguf_experts import expert_entries
    from flexbatch.weights.gguf_file import dequantize

    qtype = GGMLQuantizationType[args.qtype]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "experts.gguf"
        write_merged(path, args.experts, args.rows, args.cols, qtype)
        reader = GGUFReader(str(path))
        merged = reader.tensors[0]
        entries = list(expert_entries(reader.tensors, "qwen2_moe").values())

        def sliced():
            return float(sum(dequantize(entry)[0, 0] for entry in entries))

        def whole_per_read():
            return float(sum(quants.dequantize(merged.data, qtype)[e][0, 0] for e in range(args.experts)))

        def whole_once():
            every = quants.dequantize(merged.data, qtype)
            return float(sum(every[e][0, 0] for e in range(args.experts)))

        rows = {name: measure(fn) for name, fn in
                [("slice", sliced), ("whole_per_read", whole_per_read), ("whole_once", whole_once)]}
    for name, row in rows.items():
        print(f"{name:15s} {row['seconds']:7.2f} s  peak {row['peak_mib']:8.1f} MiB")
    assert len({row["checksum"] for row in rows.values()}) == 1, "the three ways read different values"
    result = {
        "experts": args.experts, "rows": args.rows, "cols": args.cols, "qtype": args.qtype,
        **{f"{name}_s": round(row["seconds"], 3) for name, row in rows.items()},
        **{f"{name}_peak_mib": round(row["peak_mib"], 1) for name, row in rows.items()},
        "speedup_vs_whole_per_read": round(rows["whole_per_read"]["seconds"] / rows["slice"]["seconds"], 2),
        "memory_ratio_whole_once_vs_slice": round(rows["whole_once"]["peak_mib"] / rows["slice"]["peak_mib"], 2),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
