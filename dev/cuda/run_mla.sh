#!/usr/bin/env bash
# One call on the GPU machine (repo root as cwd): builds dev/cuda/mla_attention, checks that its
# version 5 is still dsv2.cu's kernel, then checks every version against float64 and times it
# (DeepSeek-V2-Lite's 16 heads and V2's 128, batch 1 at 4K and 32K tokens, 64 sequences x 8K),
# with the copy bandwidth measured in the same process. Prints a table for docs/BENCHMARKS.md;
# the log goes to $OUT (default ./bench_out)/mla_dev.log. Exit 1 if any check fails.
# `bash dev/cuda/run_mla.sh paged`: versions 5, 6 and 7 on paged caches instead (float32 and bf16 cache,
# 16 and 128 heads, 64 sequences x 8K and mixed lengths); the log is $OUT/mla_dev_paged.log.
set -uo pipefail
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
MODE=${1:-}
LOG="$OUT/mla_dev${MODE:+_$MODE}.log"
{
    echo "### $(date -u +%Y-%m-%d), $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>&1): \`bash dev/cuda/run_mla.sh $MODE\`"
    echo
    python3 dev/cuda/same_as_dsv2.py || exit 1
    make -C dev/cuda -s || exit 1
    timeout 500 dev/cuda/mla_attention $MODE
} 2>&1 | tee "$LOG"
exit ${PIPESTATUS[0]}
