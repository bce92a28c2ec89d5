"""Log-probabilities in OpenAI's response forms, shared by batch output records and the
online server, so a request's logprobs read the same whichever way it was sent.

Completions: {"tokens": [text], "token_logprobs": [float], "top_logprobs": [{text: float}],
"text_offset": [int]}; chat: {"content": [{"token", "logprob", "bytes", "top_logprobs"}]}.
flexbatch adds each token's id ("token_ids" / "token_id"): a token's text alone can be ambiguous
(byte-level pieces of one character decode to the same replacement character).
"""
from __future__ import annotations


def token_texts(tokenizer, ids: list[int]) -> list[str]:
    """Each token decoded alone (one call: the tokenizer's batch decode); "" for every token of
    a model without a tokenizer, whose texts are empty too."""
    if tokenizer is None or not ids:
        return [""] * len(ids)
    return tokenizer.batch_decode([[t] for t in ids])


def _names(tokenizer, ids: list[int]) -> list[str]:
    """Keys of a completions top_logprobs dict: token texts, or ids as text without a tokenizer
    (empty texts would fold all alternatives into one key)."""
    return token_texts(tokenizer, ids) if tokenizer is not None else [str(t) for t in ids]


def completion_logprobs(tokenizer, ids: list[int], values: list, tops: list) -> dict:
    """`values`: per token, its logprob (None for an echoed prompt's first); `tops`: per token,
    None or a list of (id, logprob) alternatives. Text offsets count from the first token."""
    strings = token_texts(tokenizer, ids)
    offsets, position = [], 0
    for s in strings:
        offsets.append(position)
        position += len(s)
    named = [None if top is None else dict(zip(_names(tokenizer, [t for t, _ in top]), (lp for _, lp in top)))
             for top in tops]
    return {"tokens": strings, "token_logprobs": values, "top_logprobs": named, "text_offset": offsets,
            "token_ids": ids}


def generated_tops(out) -> list[list[tuple[int, float]]]:
    """A RequestOutput's alternatives per generated token; without top_logprobs, the token itself
    (the completions API's form for logprobs=0)."""
    if out.top_logprobs is not None:
        return out.top_logprobs
    return [[(t, lp)] for t, lp in zip(out.token_ids, out.logprobs)]


def chat_logprobs(tokenizer, out) -> dict:
    """The chat form of a RequestOutput's logprobs (its top alternatives if it asked for them)."""
    def entries(ids: list[int], values: list[float]) -> list[dict]:
        return [{"token": text, "logprob": lp, "bytes": list(text.encode("utf-8")), "token_id": t}
                for t, lp, text in zip(ids, values, token_texts(tokenizer, ids))]

    content = entries(out.token_ids, out.logprobs)
    for item, alternatives in zip(content, out.top_logprobs or [[]] * len(content)):
        item["top_logprobs"] = entries([t for t, _ in alternatives], [lp for _, lp in alternatives])
    return {"content": content, "refusal": None}
