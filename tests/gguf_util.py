"""Shared by the tests that write GGUF files: the metadata every transformer architecture has."""
from __future__ import annotations


def add_transformer_metadata(writer, cfg) -> None:
    """Layer count, context length and the hidden, feed-forward and head sizes of a
    transformers config, under the writer's architecture."""
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
