"""Online request bodies in, OpenAI response bodies out.

Sampling fields are checked by the job runner's own validator (jobs/params.py), so a body is
accepted online exactly when it would be accepted in a batch file; the fields only the
online API has (echo, top-N logprobs, several prompts) are taken out first.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from ..config import MAX_TOP_LOGPROBS, SamplingParams
from ..errors import ConfigError
from ..jobs.logprobs import completion_logprobs, generated_tops
from ..jobs.params import request_params
from ..jobs.validate import check_messages, check_prompt, short_json
from .errors import APIError


@dataclass
class OnlineRequest:
    prompts: list[list[int]]  # token ids, one list per choice
    params: SamplingParams
    generate: bool = True  # False: max_tokens 0 with echo (score the prompt only)
    echo: bool = False
    logprobs: int | None = None  # completions: alternatives per token (0 = the token's own only)


def _bad(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param, "invalid_request")


def _count(body: dict, name: str, low: int, high: int) -> int | None:
    value = body.pop(name, None)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise _bad(f"{name} must be an integer in [{low}, {high}], got {short_json(value)}", name)
    return value


def _params(fields: dict, defaults: SamplingParams, logprobs: int | None) -> SamplingParams:
    try:
        params = request_params(fields, defaults)
    except ConfigError as e:
        raise _bad(str(e)) from None
    if logprobs is not None:
        params = replace(params, logprobs=True, top_logprobs=logprobs)
    return params


def _encode(llm, prompt: Any, param: str) -> list[int]:
    value, error = check_prompt(prompt)
    if error:
        raise _bad(error, param)
    try:
        ids = llm.encode(value)
    except ConfigError as e:
        raise _bad(str(e), param) from None
    return ids


def completion_request(body: dict, llm, defaults: SamplingParams) -> OnlineRequest:
    body = dict(body)
    prompt = body.pop("prompt", None)
    prompts = prompt if _is_prompt_list(prompt) else [prompt]
    ids = [_encode(llm, p, "prompt") for p in prompts]
    echo = body.pop("echo", False)
    if not isinstance(echo, bool):
        raise _bad(f"echo must be true or false, got {short_json(echo)}", "echo")
    logprobs = _count(body, "logprobs", 0, MAX_TOP_LOGPROBS)
    generate = not (echo and body.get("max_tokens") == 0)
    if not generate:
        body.pop("max_tokens")
    params = _params(body, defaults, logprobs)
    _check_lengths(llm, ids, params, generate)
    return OnlineRequest(ids, params, generate, echo, logprobs)


def _is_prompt_list(prompt: Any) -> bool:
    """Several prompts: a list of strings or a list of token-id lists (OpenAI's batched form)."""
    return isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, (str, list)) for p in prompt)


def chat_request(body: dict, llm, defaults: SamplingParams) -> OnlineRequest:
    body = dict(body)
    messages, error = check_messages(body.pop("messages", None))
    if error:
        raise _bad(error, "messages")
    wants_logprobs = body.pop("logprobs", False)
    if not isinstance(wants_logprobs, bool):
        raise _bad(f"logprobs must be true or false, got {short_json(wants_logprobs)}", "logprobs")
    top = _count(body, "top_logprobs", 0, MAX_TOP_LOGPROBS)
    if top and not wants_logprobs:
        raise _bad("top_logprobs needs logprobs=true", "top_logprobs")
    try:
        ids = llm.encode(llm.apply_chat_template(messages))
    except ConfigError as e:
        raise _bad(str(e), "messages") from None
    except Exception as e:  # the template refused these messages
        raise _bad(f"cannot apply the chat template ({type(e).__name__}: {e})", "messages") from None
    params = _params(body, defaults, (top or 0) if wants_logprobs else None)
    _check_lengths(llm, [ids], params, True)
    return OnlineRequest([ids], params, logprobs=(top or 0) if wants_logprobs else None)


def _check_lengths(llm, prompts: list[list[int]], params: SamplingParams, generate: bool) -> None:
    for ids in prompts:
        try:
            llm.check_length(len(ids), params if generate else replace(params, max_new_tokens=1))
        except ConfigError as e:
            raise _bad(str(e), "prompt") from None


# ---- responses ------------------------------------------------------------------------------
def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_choice(index: int, tokenizer, prompt_ids: list[int], prompt_scores, out, echo: bool,
                      logprobs: int | None) -> dict:
    """One choice of a text completion; `prompt_scores` the prompt's ScoreOutput (with echo
    and logprobs: its top `logprobs` alternatives too), `out` a RequestOutput or None
    (max_tokens 0)."""
    prompt_text = tokenizer.decode(prompt_ids) if echo else ""
    text = prompt_text + (out.text if out is not None else "")
    choice = {"index": index, "text": text, "logprobs": None,
              "finish_reason": out.finish_reason if out is not None else "length"}
    if logprobs is None:
        return choice
    ids, values, tops = [], [], []
    if echo:  # the first prompt token has no logprob: nothing comes before it
        ids += prompt_ids
        values += [None, *prompt_scores.logprobs]
        tops += [None, *prompt_scores.top_logprobs] if logprobs else \
            [None, *([(t, lp)] for t, lp in zip(prompt_ids[1:], prompt_scores.logprobs))]
    if out is not None:
        ids += out.token_ids
        values += out.logprobs
        tops += generated_tops(out)
    choice["logprobs"] = completion_logprobs(tokenizer, ids, values, tops)
    return choice
