"""`flexbatch convert SRC DST`: write a model into flexbatch's store (one file per tensor)."""
from __future__ import annotations

import sys


def add_parser(sub) -> None:
    p = sub.add_parser("convert", help="convert a HF folder or GGUF file into flexbatch's store",
                       description="Convert a model into flexbatch's store: one file per tensor plus an "
                                   "index with shapes, dtypes and checksums. Offloading streams from it.")
    p.add_argument("src", help="HF model folder or .gguf file")
    p.add_argument("dst", help="new folder to write")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="cast floating-point tensors (default: keep the source's dtype; GGUF "
                        "quantized tensors become float32)")
    p.add_argument("--compress-weight", action="store_true",
                   help="store layer weights quantized (group-wise, asymmetric); the model then runs compressed")
    p.add_argument("--compress-bits", type=int, choices=[4, 8], default=4, help="bits per weight (default 4)")
    p.add_argument("--compress-group", type=int, default=None,
                   help="weights per quantization group (default: the grid the source file is already quantized "
                        "on, e.g. 32 for GGUF Q4_0/Q4_1/Q8_0; else 64)")
    p.set_defaults(run=run)


def run(args) -> int:
    from tqdm import tqdm

    from ..config import DEFAULT_COMPRESS_GROUP, parse_dtype
    from ..kernels.quant import QuantConfig
    from ..models import get_family
    from ..weights.loader import layer_weight_grid
    from ..weights.source import open_model
    from ..weights.store import write_store

    model = open_model(args.src)
    names = model.source.names()
    with tqdm(total=len(names), desc="converting", unit="tensor", file=sys.stderr) as bar:
        group = args.compress_group or layer_weight_grid(model.config, get_family(model.config), model.source) \
            or DEFAULT_COMPRESS_GROUP
        quant = QuantConfig(args.compress_bits, group, 1) if args.compress_weight else None
        dst = write_store(model, args.dst, parse_dtype(args.dtype), progress=lambda name, n: bar.update(1),
                          quant=quant)
    print(f"wrote {len(names)} tensors of {model.config.model_type} model to {dst}", file=sys.stderr)
    return 0
