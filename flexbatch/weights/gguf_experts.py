"""Mixtures of experts in GGUF. llama.cpp's converter writes Mixtral as architecture `llama`
with `llama.expert_count`, Qwen2-MoE as `qwen2moe`, and merges each layer's experts into one
3-D tensor per projection (`blk.N.ffn_gate_exps.weight`, numpy shape [n_expert, rows, cols]).
flexbatch's MoE family wants one 2-D matrix per expert under its Hugging Face name, so each
expert is exposed as a slice of the merged tensor: experts lie one after another and
quantization blocks run along rows, so a slice is whole blocks and reading one expert reads
and dequantizes only its own bytes."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

from ..errors import ModelFormatError
from ..models.moe import EXPERT_LAYOUT, expert_names

MERGED_EXPERTS = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down)_exps\.weight$")
# Files from before llama.cpp merged experts (early 2024) store one tensor per expert.
SPLIT_EXPERT = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down)\.(\d+)\.weight$")
PROJECTIONS = ("gate", "up", "down")  # the order of moe.expert_names
# The router and Qwen2-MoE's shared expert: GGUF layer tensor -> name after the block prefix.
BLOCK_TENSORS = {"ffn_gate_inp": "gate", "ffn_gate_inp_shexp": "shared_expert_gate",
                 "ffn_gate_shexp": "shared_expert.gate_proj", "ffn_up_shexp": "shared_expert.up_proj",
                 "ffn_down_shexp": "shared_expert.down_proj"}
LAYER_TENSOR = re.compile(r"^blk\.(\d+)\.(\w+)\.weight$")


@dataclass(frozen=True)
class Entry:
    """Where one Hugging Face tensor lives in the file: a GGUF tensor, or one expert's slice
    of it, and the shape it is read in."""

    tensor: Any  # gguf.ReaderTensor
    expert: int | None
    shape: tuple[int, ...]


def numpy_shape(tensor) -> tuple[int, ...]:
    """A GGUF tensor's shape in numpy (row-major) order; GGUF lists dimensions innermost first."""
    return tuple(int(d) for d in reversed(tensor.shape.tolist()))


def moe_config_fields(arch: str, field: Callable[..., Any], tensor_shapes: dict[str, tuple[int, ...]]) -> dict:
    """The config.json fields of a GGUF mixture of experts; {} for a dense model. Sizes the
    metadata leaves out come from the tensors' shapes, as llama.cpp reads them."""
    count = field(f"{arch}.expert_count", 0)
    if not count and arch == "qwen2moe":
        raise ModelFormatError("this qwen2moe GGUF has no qwen2moe.expert_count; the file is incomplete.")
    if not count:
        return {}
    used = field(f"{arch}.expert_used_count")
    if not used:
        raise ModelFormatError(
            f"this GGUF has {count} experts but no {arch}.expert_used_count (experts per token); "
            "the file is incomplete: convert the model again with llama.cpp's convert_hf_to_gguf.py."
        )
    if arch == "llama":  # llama.cpp renormalises the top-k weights for this architecture
        return {"model_type": "mixtral", "architectures": ["MixtralForCausalLM"], "num_local_experts": count,
                "num_experts_per_tok": used}
    if arch != "qwen2moe":
        raise ModelFormatError(f"GGUF architecture {arch!r} with experts is not supported; "
                               "supported mixtures of experts: llama (Mixtral) and qwen2moe.")
    expert_rows = tensor_shapes.get("blk.0.ffn_gate_exps.weight", (0, 0))[1]
    shared_rows = tensor_shapes.get("blk.0.ffn_gate_shexp.weight", (0,))[0]
    return {
        "model_type": "qwen2_moe",
        "architectures": ["Qwen2MoeForCausalLM"],
        "num_experts": count,
        "num_experts_per_tok": used,
        "moe_intermediate_size": field(f"{arch}.expert_feed_forward_length") or expert_rows,
        "shared_expert_intermediate_size": field(f"{arch}.expert_shared_feed_forward_length") or shared_rows,
        # llama.cpp's qwen2moe graph never renormalises; a newer converter may say otherwise.
        "norm_topk_prob": bool(field(f"{arch}.expert_weights_norm", False)),
    }


def expert_entries(tensors, model_type: str) -> dict[str, Entry]:
    """Hugging Face name -> Entry for the router, shared expert and experts of every layer."""
    block = EXPERT_LAYOUT[model_type][0]
    entries = {}
    for t in tensors:
        shape = numpy_shape(t)
        if m := MERGED_EXPERTS.match(t.name):
            j, which = m.group(1), PROJECTIONS.index(m.group(2))
            for e in range(shape[0]):
                entries[f"model.layers.{j}.{expert_names(model_type, e)[which]}.weight"] = Entry(t, e, shape[1:])
        elif m := SPLIT_EXPERT.match(t.name):
            j, which, e = m.group(1), PROJECTIONS.index(m.group(2)), int(m.group(3))
            entries[f"model.layers.{j}.{expert_names(model_type, e)[which]}.weight"] = Entry(t, None, shape)
        elif (m := LAYER_TENSOR.match(t.name)) and m.group(2) in BLOCK_TENSORS:
            if m.group(2) == "ffn_gate_inp_shexp":
                shape = (1, shape[-1])  # llama.cpp reads it as a vector; HF's is [1, hidden]
            entries[f"model.layers.{m.group(1)}.{block}{BLOCK_TENSORS[m.group(2)]}.weight"] = Entry(t, None, shape)
    return entries
