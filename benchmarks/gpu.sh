#!/usr/bin/env bash
# One CUDA GPU, about 8 minutes: the triton and torch paths of PartialFC side by side.
#   1. correctness at world 1 against the float64 oracle (fp32 at C_local 100k, fp32 + bf16 at 1M),
#      with each path's peak extra memory          -> runs/gpu/check.md
#   2. the benchmark (eta against the bare GEMMs, ms, peak memory) over C_local 1M-10M, global
#      batch 1024, d 512, bf16: materialized, chunked, triton -> runs/gpu/bench.{md,csv,json,png}
# Usage: bash benchmarks/gpu.sh [OUT_DIR]   (from the repository root; needs triton: pip install -e ".[triton]")
# Not run on the CPU machines; record its figures in docs/benchmarks.md when it runs.
set -euo pipefail
OUT=${1:-runs/gpu}
mkdir -p "$OUT"
python - <<'PY'
import torch, triton
assert torch.cuda.is_available(), "benchmarks/gpu.sh needs a CUDA GPU"
print(f"torch {torch.__version__}, triton {triton.__version__}, {torch.cuda.get_device_name()}")
PY
unset TRITON_INTERPRET
# 1. correctness (~1-2 min: the float64 oracle at 1M classes holds ~60 GB)
timeout 240 python -m benchmarks.gpu_check --classes 100000,1000000 --batch 1024 --dim 512 | tee "$OUT/check.md"
# 2. benchmark (~4-5 min); a variant that runs out of memory at a size is skipped, the run goes on
timeout 330 python -m benchmarks --device cuda --sweep 1000000,2000000,5000000,10000000 \
    --batch-per-rank 1024 --embedding-size 512 --dtype bf16 \
    --variants materialized,chunked,triton --chunk-size 65536 --warmup 2 --repeats 5 --out "$OUT"
echo "results: $OUT/check.md $OUT/bench.md"
