"""POST /v1/completions, POST /v1/chat/completions, GET /v1/models."""
from __future__ import annotations

import asyncio
import json
import secrets
import time

from fastapi import APIRouter, Request

from ..jobs.logprobs import chat_logprobs
from .errors import APIError
from .online import chat_request, completion_choice, completion_request, usage

router = APIRouter()


async def json_body(request: Request) -> dict:
    """The request's JSON object, or a 400 error object saying what is wrong with it."""
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise APIError(400, f"the request body is not valid JSON ({e})", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_request")
    return body


def _check_model(state, body: dict) -> None:
    model = body.get("model")
    if model is None:
        raise APIError(400, "model is required; GET /v1/models lists the model served", "model", "invalid_request")
    if model != state.model_name:
        raise APIError(404, f"The model {model!r} does not exist; this server serves {state.model_name!r}.",
                       "model", "model_not_found")


async def _generate(state, online) -> list:
    """Outputs of each prompt, generated in blocks with whatever else is waiting."""
    if not online.generate:
        return [None] * len(online.prompts)
    futures = [asyncio.wrap_future(state.engine.submit_online(ids, online.params)) for ids in online.prompts]
    outputs = await asyncio.gather(*futures)
    for out in outputs:
        if isinstance(out, str):  # the engine failed on this request (not the client's fault)
            raise APIError(500, out, code="server_error")
    return outputs


@router.get("/v1/models")
async def list_models(request: Request):
    return {"object": "list", "data": [_model_card(request.app.state.server)]}


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, request: Request):
    state = request.app.state.server
    if model_id != state.model_name:
        raise APIError(404, f"The model {model_id!r} does not exist.", "model", "model_not_found")
    return _model_card(state)


@router.get("/flexbatch/stats")
async def stats(request: Request):
    """How requests were grouped into blocks (not an OpenAI endpoint)."""
    from dataclasses import asdict

    return asdict(request.app.state.server.engine.stats)


def _model_card(state) -> dict:
    return {"id": state.model_name, "object": "model", "created": state.started_at, "owned_by": "flexbatch",
            "max_model_len": state.engine.llm.config.max_position_embeddings}


@router.post("/v1/completions")
async def completions(request: Request):
    state = request.app.state.server
    body = await json_body(request)
    _check_model(state, body)
    llm = state.engine.llm
    online = completion_request(body, llm, state.defaults)
    outputs = await _generate(state, online)
    prompt_scores = [None] * len(online.prompts)
    if online.echo and online.logprobs is not None:
        prompt_scores = await asyncio.wrap_future(state.engine.submit(llm.score, online.prompts, None,
                                                                      online.logprobs))
    choices = [completion_choice(i, llm.tokenizer, ids, scored, out, online.echo, online.logprobs)
               for i, (ids, scored, out) in enumerate(zip(online.prompts, prompt_scores, outputs))]
    generated = sum(len(out.token_ids) for out in outputs if out is not None)
    return {"id": f"cmpl-{secrets.token_hex(12)}", "object": "text_completion", "created": int(time.time()),
            "model": state.model_name, "choices": choices,
            "usage": usage(sum(len(p) for p in online.prompts), generated)}


@router.post("/v1/chat/completions")
async def chat_completions(request: Request):
    state = request.app.state.server
    body = await json_body(request)
    _check_model(state, body)
    llm = state.engine.llm
    online = chat_request(body, llm, state.defaults)
    (out,) = await _generate(state, online)
    choice = {"index": 0, "message": {"role": "assistant", "content": out.text},
              "logprobs": chat_logprobs(llm.tokenizer, out) if online.logprobs is not None else None,
              "finish_reason": out.finish_reason}
    return {"id": f"chatcmpl-{secrets.token_hex(12)}", "object": "chat.completion", "created": int(time.time()),
            "model": state.model_name, "choices": [choice],
            "usage": usage(len(online.prompts[0]), len(out.token_ids))}
