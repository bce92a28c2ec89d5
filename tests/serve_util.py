"""Starting a real `flexbatch serve` process for tests, and the batch files they send."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
API_KEY = "sk-flexbatch-test"
MAX_NEW_TOKENS = 8
BLOCK = 8


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m flexbatch serve` on a free localhost port, importing this checkout."""

    def __init__(self, model: Path, data_dir: Path, *extra: str):
        self.port, self.model, self.data_dir = free_port(), model, data_dir
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.log = open(data_dir.parent / f"server-{self.port}.log", "wb")
        cmd = [sys.executable, "-m", "flexbatch", "serve", "--model", str(model), "--dtype", "float32",
               "--no-plan", "--batch-size", str(BLOCK), "--max-new-tokens", str(MAX_NEW_TOKENS),
               "--port", str(self.port), "--data-dir", str(data_dir), "--api-key", API_KEY, *extra]
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self._wait_ready()

    def _wait_ready(self, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        request = urllib.request.Request(self.base_url + "/models", headers={"Authorization": f"Bearer {API_KEY}"})
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.log_text()}")
            try:
                urllib.request.urlopen(request, timeout=2).read()
                return
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"server did not start: {self.log_text()}")

    def log_text(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")[-3000:]

    def client(self, api_key: str = API_KEY, **kwargs):
        import openai

        return openai.OpenAI(base_url=self.base_url, api_key=api_key, max_retries=0, **kwargs)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self.log.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.kill()
        self.log.close()


def batch_lines(n: int, model: str, endpoint: str = "/v1/completions") -> list[dict]:
    """A batch for one endpoint: greedy and seeded sampled requests of several lengths, and
    every seventh line invalid (it gets an error record)."""
    lines = []
    for i in range(n):
        if endpoint == "/v1/chat/completions":
            body = {"model": model, "messages": [{"role": "user", "content": f"Name a color, number {i}."}]}
        else:
            body = {"model": model, "prompt": f"Fact {i}: the sky is"}
        body["max_tokens"] = 4 + i % 5
        if i % 4 == 1:
            body.update(temperature=0.8, seed=i, top_p=0.9)
        if i % 7 == 6:
            body = {"model": model, "prompt": 12345, "messages": "none"}
        lines.append({"custom_id": f"req-{i}", "method": "POST", "url": endpoint, "body": body})
    return lines


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def wait_batch(client, batch_id: str, timeout: float = 600, until=("completed", "failed", "cancelled")):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        batch = client.batches.retrieve(batch_id)
        if batch.status in until:
            return batch
        time.sleep(0.5)
    raise TimeoutError(f"batch {batch_id} still {batch.status}")


def records_by_id(text: str) -> dict[str, dict]:
    """Result lines keyed by custom_id, without the timestamps that differ between runs."""
    out = {}
    for line in text.splitlines():
        record = json.loads(line)
        body = (record.get("response") or {}).get("body")
        if body:
            body.pop("created", None)
        assert record["custom_id"] not in out, f"two results for {record['custom_id']}"
        out[record["custom_id"]] = record
    return out


def batch_results(client, batch) -> dict[str, dict]:
    text = ""
    for file_id in (batch.output_file_id, batch.error_file_id):
        if file_id:
            text += client.files.content(file_id).text
    return records_by_id(text)


def stats(server: ServerProcess) -> dict:
    request = urllib.request.Request(server.base_url.removesuffix("/v1") + "/flexbatch/stats",
                                      headers={"Authorization": f"Bearer {API_KEY}"})
    return json.loads(urllib.request.urlopen(request, timeout=30).read())
