#!/usr/bin/env bash
# Everything that needs a CUDA GPU, in one run: the GPU tests (every tier placement and every
# model family on the GPU), the C decode kernel on that machine's CPU, and a short
# flexbatch-vs-Accelerate offloading run. Logs go to $OUT (default /tmp/gpu-checks).
#   bash benchmarks/gpu_checks.sh
# Under a time limit, each part has its own (TEST_LIMIT, BENCH_LIMIT seconds).
set -u
OUT=${OUT:-/tmp/gpu-checks}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$(pwd)"
PY=${PY:-python3}
nvidia-smi -L
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__,
torch.cuda.get_device_name(0))"
timeout "${TEST_LIMIT:-330}" $PY -m pytest -q -p no:cacheprovider -o addopts="" -rfE \
    tests/test_gpu.py tests/test_gpu_families.py tests/test_native_decode.py 2>&1 | tee "$OUT/tests.log"
# OPT-1.3B's shape (2.6 GB in bf16) under a 2 GiB GPU cap: weights and KV cache in host RAM.
W='"weights_device": 0, "weights_host": 1, "cache_device": 0, "cache_host": 1'
timeout "${BENCH_LIMIT:-200}" $PY benchmarks/gpu_bench.py --shape opt-1.3b --gpu-memory 2GiB \
    --prompt-len 128 --gen-len 32 --workdir /tmp/gpu-bench \
    --policy "{\"gpu_batch_size\": 64, \"num_gpu_batches\": 4, $W}" \
    --policy "{\"gpu_batch_size\": 16, \"num_gpu_batches\": 16, $W}" \
    --hf-batches 8@1GiB,16@1GiB 2>&1 | tee "$OUT/bench.log"
