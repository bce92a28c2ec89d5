"""The Batches API: create, get, list, cancel. The batch worker runs them (batch_worker.py)."""
from __future__ import annotations

import time

from fastapi import APIRouter, Request

from .batch_worker import link_input
from .errors import APIError, not_found
from .routes_files import page
from .routes_online import json_body
from .store import new_id

router = APIRouter()
ENDPOINTS = ("/v1/completions", "/v1/chat/completions")
WINDOWS = {"24h": 24 * 3600}
FINAL = ("completed", "failed", "expired", "cancelled")


def _bad(message: str, param: str) -> APIError:
    return APIError(400, message, param, "invalid_request")


@router.post("/v1/batches")
async def create_batch(request: Request):
    state = request.app.state.server
    body = await json_body(request)
    file_id, endpoint, window = body.get("input_file_id"), body.get("endpoint"), body.get("completion_window")
    metadata = body.get("metadata")
    if not isinstance(file_id, str) or not file_id:
        raise _bad("input_file_id must be the id of an uploaded file", "input_file_id")
    if endpoint not in ENDPOINTS:
        raise _bad(f"endpoint must be one of {', '.join(ENDPOINTS)}, got {endpoint!r}", "endpoint")
    if window not in WINDOWS:
        raise _bad(f"completion_window must be one of {', '.join(WINDOWS)}, got {window!r}", "completion_window")
    _check_metadata(metadata)
    stored = state.store.get_file(file_id)
    if stored is None:
        raise not_found("file", file_id)
    if stored.purpose != "batch":
        raise _bad(f"file {file_id} has purpose {stored.purpose!r}; upload the input with purpose=batch",
                   "input_file_id")
    now = int(time.time())
    expires = now + WINDOWS[window] if state.expire_batches else None  # else: runs to the end
    doc = {"id": new_id("batch"), "object": "batch", "endpoint": endpoint, "errors": None,
           "input_file_id": file_id, "completion_window": window, "status": "validating",
           "output_file_id": None, "error_file_id": None, "created_at": now, "in_progress_at": None,
           "expires_at": expires, "finalizing_at": None, "completed_at": None, "failed_at": None,
           "expired_at": None, "cancelling_at": None, "cancelled_at": None,
           "request_counts": {"total": 0, "completed": 0, "failed": 0}, "metadata": metadata,
           "model": state.model_name}
    job_dir = state.store.new_job_dir()
    link_input(stored.path, job_dir)  # before the row exists: a listed batch always has its input
    state.store.add_batch(doc, job_dir)
    state.worker.wake()
    return doc


def _check_metadata(metadata) -> None:
    if metadata is None:
        return
    if (not isinstance(metadata, dict) or len(metadata) > 16
            or not all(isinstance(k, str) and len(k) <= 64 and isinstance(v, str) and len(v) <= 512
                       for k, v in metadata.items())):
        raise _bad("metadata must be an object of up to 16 string keys (64 characters) and string values "
                   "(512 characters)", "metadata")


def _batch(request: Request, batch_id: str) -> dict:
    batch = request.app.state.server.store.get_batch(batch_id)
    if batch is None:
        raise not_found("batch", batch_id)
    return batch


@router.get("/v1/batches/{batch_id}")
async def get_batch(batch_id: str, request: Request):
    return _batch(request, batch_id)


@router.get("/v1/batches")
async def list_batches(request: Request, limit: int = 20, after: str | None = None):
    if not 1 <= limit <= 100:
        raise APIError(400, f"limit must be in [1, 100], got {limit}", "limit", "invalid_request")
    return page(request.app.state.server.store.list_batches(limit + 1, after), limit)


@router.post("/v1/batches/{batch_id}/cancel")
async def cancel_batch(batch_id: str, request: Request):
    state = request.app.state.server
    batch = _batch(request, batch_id)
    if batch["status"] in ("cancelling", "cancelled"):
        return batch
    batch, applied = state.store.update_batch_if(batch_id, ("validating", "in_progress"), status="cancelling",
                                                 cancelling_at=int(time.time()))
    if not applied:
        raise APIError(409, f"batch {batch_id} is {batch['status']} and can no longer be cancelled",
                       code="batch_not_cancellable")
    state.worker.cancel(batch_id)
    return batch
