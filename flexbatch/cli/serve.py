"""`flexbatch serve`: the OpenAI-compatible server (completions, chat, Files, Batches)."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from .common import add_model_args, add_policy_args, add_sampling_args, run_settings, sampling_params

SERVER_RECORD = "server.json"  # the policy the data dir's batches run with, so resumes form the same blocks


def add_parser(sub) -> None:
    p = sub.add_parser(
        "serve", help="serve the model over an OpenAI-compatible HTTP API (with Files and Batches)",
        description="Load the model once and answer /v1/completions, /v1/chat/completions and /v1/models, "
                    "and run batches uploaded through /v1/files and /v1/batches one after another (the job "
                    "runner of `flexbatch run`). State lives in --data-dir: restarted with the same folder, "
                    "the server resumes every unfinished batch.")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--data-dir", default="flexbatch-data", help="folder for files, batches and their state "
                                                                 "(default ./flexbatch-data)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on every request "
                                                   "(default: $FLEXBATCH_API_KEY; none if unset)")
    p.add_argument("--served-model-name", default=None, help="model name clients send (default: the model's "
                                                             "folder or file name)")
    p.add_argument("--max-upload-bytes", type=int, default=512 << 20, help="largest file accepted (default 512 MiB)")
    p.add_argument("--expire-batches", action="store_true",
                   help="a batch expires when its completion_window (24h) closes, as OpenAI's do: its answered "
                        "requests stay in its output file, the others get batch_expired errors (default: a "
                        "batch runs to the end however long it takes, and its expires_at is null)")
    p.add_argument("--collect-ms", type=float, default=10.0,
                   help="how long an online request waits for others to share its block (default 10 ms)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="sequences per block (default: the planner's choice; 32 with --no-plan)")
    add_model_args(p)
    add_sampling_args(p)
    add_policy_args(p)
    p.set_defaults(run=run)


def run(args) -> int:
    import uvicorn

    from ..errors import ConfigError
    from ..serve.app import ServerState, create_app
    from ..serve.engine import compute_thread

    if not 0 < args.port < 65536:
        raise ConfigError(f"--port must be in [1, 65535], got {args.port}")
    api_key = args.api_key or os.environ.get("FLEXBATCH_API_KEY") or None
    if api_key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: serving on {args.host} without an API key: anyone who reaches it can use it "
              "(set --api-key or FLEXBATCH_API_KEY)", file=sys.stderr)
    data_dir = Path(args.data_dir).expanduser()
    data_dir.mkdir(parents=True, exist_ok=True)
    pool = compute_thread()  # every model computation runs on this one thread: planning and loading too
    settings = run_settings(args)
    run = pool.submit(_prepare, settings, args.max_new_tokens, data_dir).result()
    llm = pool.submit(run.build_llm).result()
    policy = run.policy
    name = args.served_model_name or llm.model_path.name
    state = ServerState.start(llm, data_dir, name, sampling_params(args), api_key, args.max_upload_bytes,
                              args.collect_ms / 1000, pool, args.expire_batches)
    print(f"serving {name} (block of {llm.batch_size} sequences, policy: {policy or 'everything in memory'}) "
          f"on http://{args.host}:{args.port}/v1, data in {data_dir}", file=sys.stderr)
    try:
        uvicorn.run(create_app(state), host=args.host, port=args.port, log_level="warning")
    finally:
        llm.close()
    return 0


def _prepare(settings, max_new_tokens: int, data_dir: Path):
    """The model opened and its policy chosen (prepare.prepare_run), recorded in the data
    dir so that a restart (and the batches it resumes) forms the same blocks."""
    from dataclasses import asdict

    from ..prepare import prepare_run

    record_path = data_dir / SERVER_RECORD
    recorded = None
    if record_path.exists():
        record = json.loads(record_path.read_text())
        recorded = (record["policy"], record["block_size"])
    # A server's prompts are unknown in advance: plan for prompts of 512 tokens.
    run = prepare_run(settings, max_new_tokens, lambda opened: (512, 10_000), recorded, str(record_path))
    record_path.write_text(json.dumps({"policy": asdict(run.policy) if run.policy else None,
                                       "block_size": run.batch_size}))
    return run
