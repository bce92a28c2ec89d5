"""The server's store on its own: durable rows, orphan cleanup, atomic finish, key check."""
from __future__ import annotations

import pytest

pytest.importorskip("fastapi")

from flexbatch.serve.app import key_matches  # noqa: E402
from flexbatch.serve.batch_worker import split_records  # noqa: E402
from flexbatch.serve.store import Store  # noqa: E402
from flexbatch.storage.disk import write_durably  # noqa: E402


def test_files_survive_reopening_and_orphans_are_removed(tmp_path):
    store = Store(tmp_path)
    path = store.new_file_path()
    write_durably(path, [b'{"a": 1}\n'])
    stored = store.add_file(path, "in.jsonl", "batch")
    orphan = store.new_file_path()
    write_durably(orphan, [b"left by a crash before registering\n"])
    store.close()

    store = Store(tmp_path)
    assert store.remove_orphan_files() == 1 and not orphan.exists()
    again = store.get_file(stored.id)
    assert again.path == path and again.bytes == 9 and again.filename == "in.jsonl"
    assert store.get_file("../server.sqlite3") is None and not store.delete_file("../server.sqlite3")
    assert (tmp_path / "server.sqlite3").exists()
    assert store.delete_file(stored.id) and not path.exists()


def test_finish_batch_registers_files_and_status_together(tmp_path):
    store = Store(tmp_path)
    doc = {"id": "batch-1", "created_at": 1, "status": "in_progress", "output_file_id": None}
    store.add_batch(doc, store.new_job_dir())
    assert [b["id"] for b in store.active_batches()] == ["batch-1"]
    out = store.new_file_path()
    write_durably(out, [b"x\n"])
    done = store.finish_batch("batch-1", [("output", out, "batch-1_output.jsonl")], status="completed")
    assert done["status"] == "completed" and store.get_file(done["output_file_id"]).purpose == "batch_output"
    assert store.active_batches() == []
    _, applied = store.update_batch_if("batch-1", ("in_progress",), status="cancelling")
    assert not applied and store.get_batch("batch-1")["status"] == "completed"


def test_split_records_ignores_a_torn_last_line(tmp_path):
    output = tmp_path / "out.jsonl"
    output.write_bytes(b'{"custom_id": "a", "error": null}\n{"custom_id": "b", "error": {"code": "x"}}\n{"custo')
    answered, failed = split_records(output)
    assert len(answered) == 1 and len(failed) == 1


def test_key_check():
    assert key_matches("Bearer sk-1", "sk-1") and key_matches("bearer sk-1", "sk-1")
    assert not any(key_matches(h, "sk-1") for h in (None, "", "sk-1", "Bearer sk-12", "Bearer sk-", "Basic sk-1"))


def test_lines_with_another_endpoint_are_found(tmp_path):
    from flexbatch.serve.batch_worker import other_endpoints

    path = tmp_path / "in.jsonl"
    path.write_text('{"url": "/v1/completions"}\nnot json\n[1]\n{"url": "/v1/chat/completions"}\n')
    assert other_endpoints(path, "/v1/completions") == [4]
    assert other_endpoints(path, "/v1/chat/completions") == [1]
