"""Write a Hugging Face folder with random weights in a published model shape (OPT), or
Mixtral's shape (8 experts, top-2) at its size or scaled down.

Benchmarks need models larger than memory; downloading them is impossible here, and their
values do not change the time a step takes. Weights are N(0, 0.02) in bf16 (fp16 on request),
saved as safetensors shards of at most 2 GiB, so both flexbatch and transformers load them.

    python benchmarks/dummy_model.py opt-6.7b /data/opt-6.7b-dummy
    python benchmarks/dummy_model.py mixtral-8x0.4b /data/mixtral-small-dummy
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

OPT_SHAPES = {  # name: (hidden, layers, heads); ffn = 4 * hidden
    "opt-125m": (768, 12, 12),
    "opt-350m": (1024, 24, 16),
    "opt-1.3b": (2048, 24, 32),
    "opt-2.7b": (2560, 32, 32),
    "opt-6.7b": (4096, 32, 32),
    "opt-13b": (5120, 40, 40),
    "opt-30b": (7168, 48, 56),
}
# name: (hidden, layers, heads, kv heads, expert intermediate); 8 experts, 2 per token, vocab 32000.
# mixtral-8x0.4b keeps Mixtral-8x7B's ratios (head_dim 128, 4 query heads per KV head,
# intermediate 3.5 x hidden) at a quarter of the width and half the depth: 1.5 B parameters.
MIXTRAL_SHAPES = {
    "mixtral-8x7b": (4096, 32, 32, 8, 14336),
    "mixtral-8x0.4b": (1024, 16, 8, 2, 3584),
}
SHAPES = sorted(OPT_SHAPES) + sorted(MIXTRAL_SHAPES)
SHARD_BYTES = 2 << 30


def opt_config(name: str) -> dict:
    hidden, layers, heads = OPT_SHAPES[name]
    return {"model_type": "opt", "architectures": ["OPTForCausalLM"], "vocab_size": 50272,
            "hidden_size": hidden, "ffn_dim": 4 * hidden, "num_hidden_layers": layers,
            "num_attention_heads": heads, "max_position_embeddings": 2048, "do_layer_norm_before": True,
            "word_embed_proj_dim": hidden, "enable_bias": True, "activation_function": "relu",
            "pad_token_id": 1, "bos_token_id": 2, "eos_token_id": 2, "tie_word_embeddings": True,
            "torch_dtype": "bfloat16"}


def mixtral_config(name: str) -> dict:
    hidden, layers, heads, kv_heads, inner = MIXTRAL_SHAPES[name]
    return {"model_type": "mixtral", "architectures": ["MixtralForCausalLM"], "vocab_size": 32000,
            "hidden_size": hidden, "intermediate_size": inner, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": hidden // heads,
            "num_local_experts": 8, "num_experts_per_tok": 2, "max_position_embeddings": 32768,
            "rms_norm_eps": 1e-5, "rope_theta": 1e6, "sliding_window": None, "hidden_act": "silu",
            "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}


def model_config(name: str) -> dict:
    return mixtral_config(name) if name in MIXTRAL_SHAPES else opt_config(name)


def tensor_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    if cfg["model_type"] == "mixtral":
        return mixtral_tensor_shapes(cfg)
    h, f, v = cfg["hidden_size"], cfg["ffn_dim"], cfg["vocab_size"]
    shapes = {"model.decoder.embed_tokens.weight": (v, h),
              "model.decoder.embed_positions.weight": (cfg["max_position_embeddings"] + 2, h),
              "model.decoder.final_layer_norm.weight": (h,), "model.decoder.final_layer_norm.bias": (h,)}
    for j in range(cfg["num_hidden_layers"]):
        p = f"model.decoder.layers.{j}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes[f"{p}self_attn.{proj}.weight"] = (h, h)
            shapes[f"{p}self_attn.{proj}.bias"] = (h,)
        shapes[f"{p}fc1.weight"], shapes[f"{p}fc1.bias"] = (f, h), (f,)
        shapes[f"{p}fc2.weight"], shapes[f"{p}fc2.bias"] = (h, f), (h,)
        for norm in ("self_attn_layer_norm", "final_layer_norm"):
            shapes[f"{p}{norm}.weight"], shapes[f"{p}{norm}.bias"] = (h,), (h,)
    return shapes


def mixtral_tensor_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    q, kv = cfg["num_attention_heads"] * cfg["head_dim"], cfg["num_key_value_heads"] * cfg["head_dim"]
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}
    for j in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{j}."
        shapes.update({f"{p}input_layernorm.weight": (h,), f"{p}post_attention_layernorm.weight": (h,),
                       f"{p}self_attn.q_proj.weight": (q, h), f"{p}self_attn.k_proj.weight": (kv, h),
                       f"{p}self_attn.v_proj.weight": (kv, h), f"{p}self_attn.o_proj.weight": (h, q),
                       f"{p}block_sparse_moe.gate.weight": (cfg["num_local_experts"], h)})
        for e in range(cfg["num_local_experts"]):
            expert = f"{p}block_sparse_moe.experts.{e}."
            shapes.update({f"{expert}w1.weight": (i, h), f"{expert}w3.weight": (i, h), f"{expert}w2.weight": (h, i)})
    return shapes


def write_dummy(name: str, folder: Path, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> Path:
    from safetensors.torch import save_file

    folder = Path(folder)
    if (folder / "config.json").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    cfg = model_config(name)
    gen = torch.Generator().manual_seed(seed)
    shard, shard_bytes, weight_map, index = {}, 0, {}, 0

    def flush():
        nonlocal shard, shard_bytes, index
        if shard:
            file = f"model-{index:05d}.safetensors"
            save_file(shard, str(folder / file), metadata={"format": "pt"})
            weight_map.update({k: file for k in shard})
            shard, shard_bytes, index = {}, 0, index + 1

    for tensor_name, shape in tensor_shapes(cfg).items():
        if tensor_name.endswith("norm.weight"):
            t = torch.ones(shape, dtype=dtype)
        else:
            t = (torch.randn(shape, generator=gen) * 0.02).to(dtype)
        shard[tensor_name] = t
        shard_bytes += t.numel() * t.element_size()
        if shard_bytes >= SHARD_BYTES:
            flush()
    flush()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    return folder


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("shape", choices=SHAPES)
    p.add_argument("folder")
    args = p.parse_args()
    print(write_dummy(args.shape, Path(args.folder)))


if __name__ == "__main__":
    main()
