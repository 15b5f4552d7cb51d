#!/usr/bin/env bash
# End-to-end ./dsv2cu on the random DeepSeek-V2-Lite-shaped model (tools/make_random_model.py): greedy
# and -t 0.8 -p 0.9, this tree against a base build (issue 14: sampling on the GPU, honest timings),
# next to --bench's decode figure at context 512. One call on the GPU machine, repo root as cwd:
#   bash tools/bench_sampling.sh            base = git ref $BASE_REF (default main), extracted to build/base
#   BASE_DIR=dir bash tools/bench_sampling.sh   base = dsv2.c, dsv2.cu and *.cuh already in dir
# Prints a table for docs/BENCHMARKS.md; logs under $OUT (default bench_out). About 3 minutes with the model made.
# BENCH_LOG=file: take --bench's decode figure at context 512 from that log (tools/bench_cuda.sh's, same machine)
# instead of running --bench again.
set -uo pipefail
OUT=${OUT:-bench_out}
MODEL=${MODEL:-build/v2lite_random.bin}
N=${N:-512}
PROMPT=${PROMPT:-$(for i in $(seq 80); do printf 'The jury said that the city '; done)}  # about 480 tokens
BASE_DIR=${BASE_DIR:-build/base}
LOG="$OUT/sampling.log"
mkdir -p "$OUT" build
if [ ! -f "$BASE_DIR/dsv2.cu" ]; then
  mkdir -p "$BASE_DIR"
  git archive "${BASE_REF:-main}" dsv2.c dsv2.cu $(git ls-tree --name-only "${BASE_REF:-main}" | grep '\.cuh$') | tar -x -C "$BASE_DIR" || exit 1
fi
[ -f "$MODEL" ] || { timeout 240 python3 tools/make_random_model.py "$MODEL" --config-out build/v2lite_cfg > "$OUT/model.log" 2>&1 & }
[ -x "$BASE_DIR/dsv2cu" ] || (cd "$BASE_DIR" && timeout 200 nvcc -O3 -arch=sm_90 -Xcompiler -fopenmp -o dsv2cu dsv2.cu -lcublas -lgomp)
timeout 200 make dsv2cu > /dev/null
wait
for build in base new; do
  bin=./dsv2cu; [ $build = base ] && bin="$BASE_DIR/dsv2cu"
  for mode in greedy sampled; do
    flags="-t 0"; [ $mode = sampled ] && flags="-t 0.8 -p 0.9 -s 1"
    timeout 120 $bin "$MODEL" -z tokenizer.bin $flags -n "$N" -i "$PROMPT" > "$OUT/e2e_${build}_${mode}.txt" 2> "$OUT/e2e_${build}_${mode}.err"
    echo "E2E $build $mode rc $? | $(grep -h 'model on the GPU' "$OUT/e2e_${build}_${mode}.err") | $(grep -h 'tok/s' "$OUT/e2e_${build}_${mode}.err")" | tee -a "$LOG"
  done
done
if [ -n "${BENCH_LOG:-}" ]; then  # the --bench decode figure of an earlier run on this machine (tools/bench_cuda.sh's log)
  grep "BENCH decode ctx 512 " "$BENCH_LOG" | tee -a "$LOG"
else
  timeout 180 ./dsv2cu --bench "$MODEL" --check 1 --ctx 512 --prompt 512 2>&1 | tee -a "$LOG"
fi
python3 - "$LOG" "$N" <<'PY'
import re, sys
log, n = open(sys.argv[1]).read(), sys.argv[2]
e2e = {}
for build, mode, up, p_tps, g_n, g_tps in re.findall(r"E2E (\w+) (\w+) rc \d+ \| dsv2cu: model on the GPU in ([\d.]+) s.*?\| prompt: \d+ tokens, ([\d.]+) tok/s; generated: (\d+) tokens, ([\d.]+) tok/s", log):
    e2e[build, mode] = (float(up), float(p_tps), int(g_n), float(g_tps))
bench = re.search(r"BENCH decode ctx 512 ms [\d.]+ tok_per_s ([\d.]+)", log)
print(f"| build | upload s | prompt tok/s | greedy tok/s | -t 0.8 -p 0.9 tok/s | sampled / greedy | greedy / --bench decode ctx 512 ({bench.group(1) if bench else '?'}) |")
print("|---|---|---|---|---|---|---|")
for build in ("base", "new"):
    g, s = e2e.get((build, "greedy")), e2e.get((build, "sampled"))
    if not g or not s: print(f"| {build} | missing | | | | | |"); continue
    ratio = f"{g[3] / float(bench.group(1)):.3f}" if bench else "?"
    print(f"| {build} | {g[0]:.1f} | {g[1]:.1f} | {g[3]:.1f} ({g[2]} tokens) | {s[3]:.1f} ({s[2]} tokens) | {s[3] / g[3]:.3f} | {ratio} |")
PY
