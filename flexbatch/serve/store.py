"""The server's durable state: file and batch metadata in SQLite, file contents on disk.

    data_dir/
      server.sqlite3          files and batches tables (WAL: readers never wait for the writer)
      files/<random>.jsonl    uploaded and result contents, under names the server chose
      jobs/<random>/          each batch's job output and manifest (the runner's durable state)

Ids that arrive in requests are only ever looked up in the database, never joined to a path:
every path comes out of a row the server wrote. One connection behind a lock serves every
thread, so there is a single writer.
"""
from __future__ import annotations

import json
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY, filename TEXT NOT NULL, purpose TEXT NOT NULL, bytes INTEGER NOT NULL,
    created_at INTEGER NOT NULL, storage_name TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS batches (
    id TEXT PRIMARY KEY, created_at INTEGER NOT NULL, doc TEXT NOT NULL, job_dir TEXT NOT NULL);
"""
# Statuses a batch may still leave; the worker picks these up again after a restart.
ACTIVE_STATUSES = ("validating", "in_progress", "finalizing", "cancelling")


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


@dataclass
class StoredFile:
    id: str
    filename: str
    purpose: str
    bytes: int
    created_at: int
    path: Path

    def to_api(self) -> dict:
        return {"id": self.id, "object": "file", "bytes": self.bytes, "created_at": self.created_at,
                "filename": self.filename, "purpose": self.purpose, "status": "processed",
                "status_details": None, "expires_at": None}


class Store:
    def __init__(self, data_dir: Path):
        self.data_dir = Path(data_dir)
        self.files_dir = self.data_dir / "files"
        self.jobs_dir = self.data_dir / "jobs"
        for folder in (self.files_dir, self.jobs_dir):
            folder.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.data_dir / "server.sqlite3", check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # a batch row said "completed" survives power loss
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _query(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # ---- files ----------------------------------------------------------------------------
    def new_file_path(self) -> Path:
        """A fresh, unguessable place for a file's contents (written, then registered)."""
        return self.files_dir / f"{secrets.token_hex(16)}.jsonl"

    def add_file(self, path: Path, filename: str, purpose: str) -> StoredFile:
        """Register contents already written (and fsynced) at `path`, a name from new_file_path."""
        stored = StoredFile(new_id("file"), filename, purpose, path.stat().st_size, int(time.time()), path)
        self._query("INSERT INTO files VALUES (?, ?, ?, ?, ?, ?)",
                    (stored.id, filename, purpose, stored.bytes, stored.created_at, path.name))
        return stored

    def get_file(self, file_id: str) -> StoredFile | None:
        rows = self._query("SELECT * FROM files WHERE id = ?", (file_id,))
        return self._file(rows[0]) if rows else None

    def list_files(self, purpose: str | None = None, limit: int = 10000, after: str | None = None,
                   ascending: bool = False) -> list[StoredFile]:
        sql, args = "SELECT * FROM files WHERE 1", []
        if purpose:
            sql += " AND purpose = ?"
            args.append(purpose)
        if after and (anchor := self.get_file(after)):
            sql += f" AND (created_at, id) {'>' if ascending else '<'} (?, ?)"
            args += [anchor.created_at, anchor.id]
        order = "ASC" if ascending else "DESC"
        sql += f" ORDER BY created_at {order}, id {order} LIMIT ?"
        return [self._file(r) for r in self._query(sql, (*args, limit))]

    def delete_file(self, file_id: str) -> bool:
        stored = self.get_file(file_id)
        if stored is None:
            return False
        self._query("DELETE FROM files WHERE id = ?", (file_id,))
        stored.path.unlink(missing_ok=True)
        return True

    def _file(self, row: tuple) -> StoredFile:
        file_id, filename, purpose, size, created_at, storage_name = row
        return StoredFile(file_id, filename, purpose, size, created_at, self.files_dir / storage_name)

    def remove_orphan_files(self) -> int:
        """Delete contents no row refers to: left by a crash between writing and registering."""
        known = {r[0] for r in self._query("SELECT storage_name FROM files")}
        orphans = [p for p in self.files_dir.iterdir() if p.name not in known]
        for path in orphans:
            path.unlink(missing_ok=True)
        return len(orphans)

    # ---- batches --------------------------------------------------------------------------
    def new_job_dir(self) -> Path:
        job_dir = self.jobs_dir / secrets.token_hex(16)
        job_dir.mkdir()
        return job_dir

    def add_batch(self, doc: dict, job_dir: Path) -> None:
        """Store a new batch object, whose job runs in `job_dir` (from new_job_dir)."""
        self._query("INSERT INTO batches VALUES (?, ?, ?, ?)",
                    (doc["id"], doc["created_at"], json.dumps(doc), job_dir.name))

    def get_batch(self, batch_id: str) -> dict | None:
        rows = self._query("SELECT doc FROM batches WHERE id = ?", (batch_id,))
        return json.loads(rows[0][0]) if rows else None

    def batch_job_dir(self, batch_id: str) -> Path:
        return self.jobs_dir / self._query("SELECT job_dir FROM batches WHERE id = ?", (batch_id,))[0][0]

    def update_batch(self, batch_id: str, **changes) -> dict:
        """Apply `changes` to a batch object atomically (read-modify-write under the lock)."""
        with self._lock:
            doc = json.loads(self._db.execute("SELECT doc FROM batches WHERE id = ?", (batch_id,)).fetchone()[0])
            doc.update(changes)
            self._db.execute("UPDATE batches SET doc = ? WHERE id = ?", (json.dumps(doc), batch_id))
        return doc

    def update_batch_if(self, batch_id: str, statuses: tuple[str, ...], **changes) -> tuple[dict, bool]:
        """Apply `changes` only if the batch's status is one of `statuses`: (batch, applied)."""
        with self._lock:
            doc = json.loads(self._db.execute("SELECT doc FROM batches WHERE id = ?", (batch_id,)).fetchone()[0])
            if doc["status"] not in statuses:
                return doc, False
            doc.update(changes)
            self._db.execute("UPDATE batches SET doc = ? WHERE id = ?", (json.dumps(doc), batch_id))
        return doc, True

    def finish_batch(self, batch_id: str, files: list[tuple[str, Path, str]], **changes) -> dict:
        """Register a batch's result files [(kind, path, filename)] and set its final state, in
        one transaction: a crash leaves either all of it or none."""
        now = int(time.time())
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                doc = json.loads(self._db.execute("SELECT doc FROM batches WHERE id = ?", (batch_id,)).fetchone()[0])
                for kind, path, filename in files:
                    file_id = new_id("file")
                    self._db.execute("INSERT INTO files VALUES (?, ?, ?, ?, ?, ?)",
                                     (file_id, filename, "batch_output", path.stat().st_size, now, path.name))
                    doc[f"{kind}_file_id"] = file_id
                doc.update(changes)
                self._db.execute("UPDATE batches SET doc = ? WHERE id = ?", (json.dumps(doc), batch_id))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return doc

    def list_batches(self, limit: int = 20, after: str | None = None) -> list[dict]:
        sql, args = "SELECT doc FROM batches", []
        if after and (anchor := self.get_batch(after)):
            sql += " WHERE (created_at, id) < (?, ?)"
            args += [anchor["created_at"], after]
        sql += " ORDER BY created_at DESC, id DESC LIMIT ?"
        return [json.loads(r[0]) for r in self._query(sql, (*args, limit))]

    def active_batches(self) -> list[dict]:
        """Batches not yet in a final state, oldest first (the order they run in)."""
        docs = [json.loads(r[0]) for r in self._query("SELECT doc FROM batches ORDER BY created_at, rowid")]
        return [d for d in docs if d["status"] in ACTIVE_STATUSES]
