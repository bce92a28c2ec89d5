"""A tiny random Llama that carries the default model's real tokenizer (49,152 tokens), for
tests of text-level features (structured output, wrangling) that tiny byte-vocabulary models
cannot exercise."""
from __future__ import annotations

from pathlib import Path

import torch


def tiny_llama_with_tokenizer(folder: Path, tokenizer_source: Path) -> Path:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_source))
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=None, pad_token_id=0)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5 if p.dim() > 1 else 0.1)  # peaked, arbitrary preferences
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
