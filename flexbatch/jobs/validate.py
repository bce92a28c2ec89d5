"""Checking one request body's prompt or messages, in the shapes OpenAI's API accepts.

A chat message's content is a string or a list of parts; text parts are joined, any other
part (images, audio, files) is refused for that request alone. Sampling fields are checked
in params.py.
"""
from __future__ import annotations

import json
from typing import Any

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
UNSUPPORTED_MESSAGE_KEYS = ("tool_calls", "function_call", "tool_call_id", "audio", "refusal")


def check_body(request, body: Any) -> str | None:
    """Fill `request` (a JobRequest) from a request body; return an error message or None."""
    if not isinstance(body, dict):
        return f"body must be a JSON object, got {short_json(body)}"
    fields = dict(body)
    if request.kind == "chat" or ("messages" in fields and "prompt" not in fields):
        request.kind = "chat"
        messages, error = check_messages(fields.pop("messages", None))
        request.messages = messages
    else:
        request.prompt, error = check_prompt(fields.pop("prompt", None))
    request.fields = fields
    return error


def check_prompt(prompt: Any) -> tuple[str | list[int] | None, str | None]:
    """A prompt is a string or a list of token ids; a one-element list of either is unwrapped."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return (prompt, None) if prompt else (None, "prompt is empty")
    if isinstance(prompt, list) and prompt and all(_is_token_id(t) for t in prompt):
        return prompt, None
    if isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, str) for p in prompt):
        return None, f"prompt holds {len(prompt)} prompts; send one prompt per request (one line each)"
    return None, f"prompt must be a string or a list of token ids, got {short_json(prompt)}"


def _is_token_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**31


def check_messages(messages: Any) -> tuple[list[dict] | None, str | None]:
    """Messages normalized to {"role", "content": str}, or an error naming the bad message."""
    if not isinstance(messages, list) or not messages:
        return None, f"messages must be a non-empty list of messages, got {short_json(messages)}"
    out = []
    for i, message in enumerate(messages):
        normalized, error = _check_message(message)
        if error:
            return None, f"messages[{i}]: {error}"
        out.append(normalized)
    if out[-1]["role"] == "system":
        return None, "the last message is a system message; end with a user (or assistant) message"
    return out, None


def _check_message(message: Any) -> tuple[dict | None, str | None]:
    if not isinstance(message, dict):
        return None, f"a message must be an object with role and content, got {short_json(message)}"
    role = message.get("role")
    if role not in ROLES:
        return None, f"role {short_json(role)} is not supported; use one of {', '.join(ROLES)}"
    unsupported = [k for k in UNSUPPORTED_MESSAGE_KEYS if message.get(k) is not None]
    if unsupported:
        return None, f"{', '.join(unsupported)} in a message is not supported (no tool calling)"
    content, error = _content_text(message.get("content"))
    if error:
        return None, error
    return {"role": ROLES[role], "content": content}, None


def _content_text(content: Any) -> tuple[str | None, str | None]:
    if isinstance(content, str):
        return content, None
    if not isinstance(content, list) or not content:
        return None, f"content must be a string or a non-empty list of text parts, got {short_json(content)}"
    texts = []
    for part in content:
        if not isinstance(part, dict) or part.get("type") != "text":
            kind = part.get("type") if isinstance(part, dict) else None
            what = f"type {short_json(kind)}" if kind is not None else short_json(part)
            return None, f"content part of {what} is not supported; only text parts ({{\"type\": \"text\", ...}})"
        if not isinstance(part.get("text"), str):
            return None, f"a text part needs a string `text`, got {short_json(part.get('text'))}"
        texts.append(part["text"])
    return "\n".join(texts), None


def short_json(value: Any, limit: int = 60) -> str:
    """A value as JSON, cut to `limit` characters, for error messages."""
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError, RecursionError):
        text = type(value).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."
