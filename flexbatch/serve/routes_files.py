"""The Files API: upload (multipart, purpose=batch), list, get, content, delete."""
from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse
from starlette.datastructures import UploadFile

from ..storage.disk import write_durably
from .errors import APIError, not_found

router = APIRouter()
PURPOSES = ("batch",)
CHUNK = 1 << 20


@router.post("/v1/files")
async def upload_file(request: Request):
    state = request.app.state.server
    try:
        form = await request.form(max_files=1, max_fields=8)
    except Exception as e:  # not multipart, or a malformed one
        raise APIError(400, f"expected a multipart/form-data body with `file` and `purpose` ({e})",
                       code="invalid_request") from None
    upload, purpose = form.get("file"), form.get("purpose")
    if not isinstance(upload, UploadFile):
        raise APIError(400, "missing `file`: send the file as a multipart form field named file", "file",
                       "invalid_request")
    if purpose not in PURPOSES:
        raise APIError(400, f"purpose must be one of {', '.join(PURPOSES)} (got {purpose!r})", "purpose",
                       "invalid_request")
    path = state.store.new_file_path()
    try:
        await asyncio.to_thread(_save, upload, path, state.max_upload_bytes)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    finally:
        await form.close()  # the parser's temporary copy
    stored = state.store.add_file(path, _clean_name(upload.filename), purpose)
    return stored.to_api()


def _save(upload: UploadFile, path, limit: int) -> None:
    """Copy the upload to `path` (fsynced), refusing it once it passes `limit` bytes."""
    received = 0

    def chunks():
        nonlocal received
        while chunk := upload.file.read(CHUNK):
            received += len(chunk)
            if received > limit:
                raise APIError(413, f"the file is larger than this server's upload limit of {limit} bytes "
                                    "(flexbatch serve --max-upload-bytes)", "file", "file_too_large")
            yield chunk

    write_durably(path, chunks())


def _clean_name(name: str | None) -> str:
    """The client's file name, kept only as a label (never used as a path)."""
    name = (name or "upload.jsonl").replace("\\", "/").rsplit("/", 1)[-1]
    return "".join(ch for ch in name if ch.isprintable())[:255] or "upload.jsonl"


@router.get("/v1/files")
async def list_files(request: Request, purpose: str | None = None, limit: int = 10000, after: str | None = None,
                     order: str = "desc"):
    if not 1 <= limit <= 10000:
        raise APIError(400, f"limit must be in [1, 10000], got {limit}", "limit", "invalid_request")
    if order not in ("asc", "desc"):
        raise APIError(400, f"order must be asc or desc, got {order!r}", "order", "invalid_request")
    files = request.app.state.server.store.list_files(purpose, limit + 1, after, order == "asc")
    return page([f.to_api() for f in files], limit)


def page(items: list[dict], limit: int) -> dict:
    """A cursor page as OpenAI returns it (the client follows `has_more` with `after`)."""
    shown = items[:limit]
    return {"object": "list", "data": shown, "has_more": len(items) > limit,
            "first_id": shown[0]["id"] if shown else None, "last_id": shown[-1]["id"] if shown else None}


def _file(request: Request, file_id: str):
    stored = request.app.state.server.store.get_file(file_id)
    if stored is None:
        raise not_found("file", file_id)
    return stored


@router.get("/v1/files/{file_id}")
async def get_file(file_id: str, request: Request):
    return _file(request, file_id).to_api()


@router.get("/v1/files/{file_id}/content")
async def file_content(file_id: str, request: Request):
    stored = _file(request, file_id)
    return FileResponse(stored.path, media_type="application/jsonl", filename=stored.filename)


@router.delete("/v1/files/{file_id}")
async def delete_file(file_id: str, request: Request):
    if not request.app.state.server.store.delete_file(file_id):
        raise not_found("file", file_id)
    return {"id": file_id, "object": "file", "deleted": True}
