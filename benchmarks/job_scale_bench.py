"""Job-runner scale benchmark: `flexbatch run` on a 1,000,000-request JSONL file.

Runs the README's main command (planner on, default model) twice, each in its own process:
over a small file (the baseline: model + policy + the runner's fixed cost) and over the large
one. For each it records when the model finished loading (the "model ..." line on stderr),
when the first result was durable in the output (a complete line on disk: results are fsynced
before the next block starts), and the process's peak RSS (VmHWM) at that moment; then it
stops the job. The figures: the large run's peak RSS minus the baseline's (memory that grows
with the input), and seconds from model loaded to first durable result.

    python benchmarks/job_scale_bench.py --requests 1000000
"""
from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOPICS = ["a refund request", "a shipping delay", "a product review", "a login problem", "an invoice question"]


def write_requests(path: Path, n: int) -> None:
    """Short classification prompts in plain JSONL (one request per line)."""
    with open(path, "w") as f:
        for i in range(n):
            prompt = f"Ticket {i}: the customer writes about {TOPICS[i % len(TOPICS)]}. Category:"
            f.write(json.dumps({"id": f"t{i}", "prompt": prompt}) + "\n")


def peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


def watch_stderr(proc, events: dict, log: list[str]) -> None:
    for line in proc.stderr:
        log.append(line.rstrip())
        if line.startswith("model ") and "loaded" not in events:
            events["loaded"] = time.perf_counter()


def first_result(path: Path, proc, timeout: float) -> float | None:
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline and proc.poll() is None:
        if path.exists() and b"\n" in _head(path):
            return time.perf_counter()
        time.sleep(0.05)
    return None


def _head(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(1 << 16)


def run_once(requests: Path, out: Path, max_new_tokens: int, timeout: float) -> dict:
    cmd = [sys.executable, "-m", "flexbatch", "run", str(requests), "-o", str(out),
           "--max-new-tokens", str(max_new_tokens)]
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    events, log = {}, []
    reader = threading.Thread(target=watch_stderr, args=(proc, events, log), daemon=True)
    reader.start()
    first = first_result(out, proc, timeout)
    rss = peak_rss(proc.pid) if proc.poll() is None else None
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
    reader.join(timeout=5)
    if first is None or rss is None or "loaded" not in events:
        sys.exit("the job did not produce a result in time:\n" + "\n".join(log[-20:]))
    return {"seconds_to_model_loaded": round(events["loaded"] - started, 2),
            "seconds_loaded_to_first_result": round(first - events["loaded"], 2),
            "peak_rss_mib": round(rss / 2**20, 1), "policy": next((x for x in log if x.startswith("model ")), "")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=1_000_000)
    ap.add_argument("--baseline-requests", type=int, default=1_000)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--workdir", default=None, help="where the input files go (default: a temp folder)")
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="flexbatch-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = {}
    for label, n in (("baseline", args.baseline_requests), ("large", args.requests)):
        src = work / f"requests-{n}.jsonl"
        if not src.exists():
            write_requests(src, n)
        out = work / f"out-{n}.jsonl"
        for leftover in work.glob(f"out-{n}.jsonl*"):
            leftover.unlink()
        rows[label] = {"requests": n, "input_mib": round(src.stat().st_size / 2**20, 1),
                       **run_once(src, out, args.max_new_tokens, args.timeout)}
        print(f"{label:9s} {n:>9d} requests ({rows[label]['input_mib']} MiB): model loaded after "
              f"{rows[label]['seconds_to_model_loaded']}s, first durable result "
              f"{rows[label]['seconds_loaded_to_first_result']}s later, peak RSS {rows[label]['peak_rss_mib']} MiB")
    growth = rows["large"]["peak_rss_mib"] - rows["baseline"]["peak_rss_mib"]
    print(f"peak RSS growth with the input: {growth:.1f} MiB (target <= 300); first result "
          f"{rows['large']['seconds_loaded_to_first_result']}s after the model loaded (target <= 60)")
    print(json.dumps({"bench": "job_scale", **{k: v for k, v in rows.items()}, "rss_growth_mib": round(growth, 1),
                      "rss_growth_within_300mib": growth <= 300,
                      "first_result_within_60s": rows["large"]["seconds_loaded_to_first_result"] <= 60}))


if __name__ == "__main__":
    main()
