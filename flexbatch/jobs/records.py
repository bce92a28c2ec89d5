"""Output records: the OpenAI batch output format for batch inputs, a flat one otherwise.

Record ids are derived from the request id, so a resumed job writes exactly the lines an
uninterrupted one would (only `created` timestamps differ).
"""
from __future__ import annotations

import time
import uuid

from .inputs import JobRequest
from .logprobs import chat_logprobs, completion_logprobs, generated_tops

NAMESPACE = uuid.UUID("6f1e1c2a-3b7d-4c5e-9a8b-0d2f4e6a8c1b")


def _stable_id(prefix: str, request_id: str) -> str:
    return f"{prefix}-{uuid.uuid5(NAMESPACE, request_id).hex}"


def openai_record(req: JobRequest, model: str, output=None, error: str | None = None,
                  server_error: bool = False, tokenizer=None) -> dict:
    """A batch output line. `server_error`: the engine failed on the request (status 500),
    rather than the request being invalid (400). `tokenizer` names the tokens of logprobs."""
    request_id = _stable_id("flexbatch", req.id)
    if error is not None:
        status, code = (500, "server_error") if server_error else (400, "invalid_request")
        return {"id": _stable_id("batch_req", req.id), "custom_id": req.id,
                "response": {"status_code": status, "request_id": request_id, "body": None},
                "error": {"code": code, "message": error}}
    usage = {"prompt_tokens": len(output.prompt_token_ids), "completion_tokens": len(output.token_ids),
             "total_tokens": len(output.prompt_token_ids) + len(output.token_ids)}
    if req.kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": output.text},
                  "finish_reason": output.finish_reason,
                  "logprobs": chat_logprobs(tokenizer, output) if output.logprobs is not None else None}
        body = {"id": f"chatcmpl-{request_id}", "object": "chat.completion"}
    else:
        choice = {"index": 0, "text": output.text, "finish_reason": output.finish_reason,
                  "logprobs": completion_logprobs(tokenizer, output.token_ids, output.logprobs,
                                                  generated_tops(output)) if output.logprobs is not None else None}
        body = {"id": f"cmpl-{request_id}", "object": "text_completion"}
    body.update(created=int(time.time()), model=model, choices=[choice], usage=usage)
    return {"id": _stable_id("batch_req", req.id), "custom_id": req.id,
            "response": {"status_code": 200, "request_id": request_id, "body": body}, "error": None}


def expired_record(req: JobRequest) -> dict:
    """A batch output line for a request its batch's completion window closed on before it
    ran (OpenAI's `batch_expired` error: the line goes to the batch's error file)."""
    return {"id": _stable_id("batch_req", req.id), "custom_id": req.id, "response": None,
            "error": {"code": "batch_expired",
                      "message": "the batch's completion window closed before this request ran"}}


def simple_record(req: JobRequest, model: str, output=None, error: str | None = None,
                  server_error: bool = False, tokenizer=None) -> dict:
    """A flat output line: the text, and with logprobs the token ids, their logprobs and any
    top alternatives ([[id, logprob], ...] per token)."""
    if error is not None:
        return {"id": req.id, "error": error}
    record = {"id": req.id, "text": output.text, "finish_reason": output.finish_reason,
              "prompt_tokens": len(output.prompt_token_ids), "completion_tokens": len(output.token_ids)}
    if output.logprobs is not None:
        record["token_ids"] = output.token_ids
        record["logprobs"] = output.logprobs
        if output.top_logprobs is not None:
            record["top_logprobs"] = [[list(pair) for pair in top] for top in output.top_logprobs]
    return record
