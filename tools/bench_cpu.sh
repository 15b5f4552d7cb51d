#!/usr/bin/env bash
# tools/bench_cpu.sh: dsv2 on this machine's CPU against llama.cpp, both on the same random
# DeepSeek-V2-Lite-shaped q8 weights (llama.cpp's Q8_0), the same threads; prints the table for
# docs/BENCHMARKS.md (also written to $OUT/table.md). Run it on a quiet machine: it times things.
#
#   LLAMA_BENCH=/path/to/llama-bench tools/bench_cpu.sh
#
# It measures the memory read bandwidth (tools/read_bandwidth.c, a few GB), writes the model
# (tools/make_random_model.py: 27 layers, q8, 16.7 GB; routing and RoPE neutral, so llama.cpp
# computes the same model), runs ./dsv2 on a PROMPT-token prompt plus GEN generated tokens, converts
# the model to GGUF (tools/to_gguf.py) and runs llama.cpp's llama-bench -p PROMPT -n GEN. It also
# runs dsv2 built with -DDSV2_PLAIN_C (q8 products in plain C instead of AVX-512): what that path buys.
# Without LLAMA_BENCH (a llama-bench built from llama.cpp's source, CPU backend) the baseline is SKIPPED.
# Environment (defaults): THREADS (all cores), LAYERS (27), PROMPT (512), GEN (128),
# MODEL (build/bench_cpu/v2lite_q8.bin; kept for the next run), KEEP_GGUF (unset: the GGUF,
# another 16.7 GB, is deleted afterwards), TOK_DIR (../shared/data/deepseek-v2-tokenizer),
# OUT (build/bench_cpu).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-build/bench_cpu}
THREADS=${THREADS:-$(nproc)}
LAYERS=${LAYERS:-27}
PROMPT=${PROMPT:-512}
GEN=${GEN:-128}
MODEL=${MODEL:-$OUT/v2lite_q8.bin}
TOK_DIR=${TOK_DIR:-../shared/data/deepseek-v2-tokenizer}
GGUF=$OUT/$(basename "$MODEL" .bin).gguf
LOG=$OUT/bench.log
mkdir -p "$OUT"
: > "$LOG"
t_start=$(date +%s)
say() { echo "== [$(( $(date +%s) - t_start ))s] $*" | tee -a "$LOG"; }
die() { say "error: $*"; exit 1; }

say "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB; load $(cut -d' ' -f1-3 /proc/loadavg); threads $THREADS"
say "1. build"
make -s dsv2 build/tok/v2.bin >> "$LOG" 2>&1 || die "make dsv2 build/tok/v2.bin failed (the tokenizer needs $TOK_DIR)"
gcc -O3 -march=native -fopenmp -o "$OUT/read_bandwidth" tools/read_bandwidth.c || die "cannot build tools/read_bandwidth.c"
gcc -O3 -march=native -fopenmp -DDSV2_PLAIN_C -o "$OUT/dsv2_plain_c" dsv2.c -lm || die "cannot build dsv2 with -DDSV2_PLAIN_C"

say "2. memory read bandwidth (4 GB, $THREADS threads, best of 5)"
OMP_NUM_THREADS=$THREADS "$OUT/read_bandwidth" 4 | tee -a "$LOG"

say "3. the model: $MODEL"
if [ ! -f "$MODEL" ]; then
  python3 tools/make_random_model.py "$MODEL" --shape v2-lite --layers "$LAYERS" --dtype q8 2>&1 | tee -a "$LOG" || die "make_random_model failed"
fi

say "4. dsv2: a $PROMPT-token prompt, $GEN generated tokens (greedy), $THREADS threads"
# the prompt: the first words of the workshop's English text, as many as make PROMPT tokens with BOS
TEXT=$(python3 - "$PROMPT" <<'PY'
import subprocess, sys
want, words = int(sys.argv[1]), open("docs/workshop/english.txt", encoding="utf-8").read().split()
while len(words) < 4 * want:
    words += words
def count(k):
    ids = subprocess.run(["./dsv2", "-m", "encode", "-z", "build/tok/v2.bin", "-i", " ".join(words[:k])],
                         capture_output=True, text=True, check=True).stdout.split()
    return len(ids)
lo, hi = 1, 4 * want  # the largest k with count(k) <= want
while lo < hi:
    mid = (lo + hi + 1) // 2
    lo, hi = (mid, hi) if count(mid) <= want else (lo, mid - 1)
if count(lo) != want:
    sys.exit(f"no prefix of the text is exactly {want} tokens ({count(lo)})")
print(" ".join(words[:lo]))
PY
) || die "could not make a $PROMPT-token prompt"
cat "$MODEL" > /dev/null  # into the page cache first: timed runs should not wait on the disk
./dsv2 "$MODEL" -z build/tok/v2.bin -t 0 -n "$GEN" --threads "$THREADS" -i "$TEXT" > "$OUT/dsv2_out.txt" 2> "$OUT/dsv2_err.txt"
rc=$?
tail -4 "$OUT/dsv2_err.txt" | tee -a "$LOG"
[ $rc -eq 0 ] || say "dsv2 failed (exit $rc)"
say "4b. the same, dsv2 built with -DDSV2_PLAIN_C"
"$OUT/dsv2_plain_c" "$MODEL" -z build/tok/v2.bin -t 0 -n "$GEN" --threads "$THREADS" -i "$TEXT" > /dev/null 2> "$OUT/dsv2_plain_c_err.txt" ||
  say "dsv2 -DDSV2_PLAIN_C failed"
tail -4 "$OUT/dsv2_plain_c_err.txt" | tee -a "$LOG"

say "5. llama.cpp on the same weights"
if [ -n "${LLAMA_BENCH:-}" ] && [ -x "$LLAMA_BENCH" ]; then
  python3 tools/to_gguf.py "$MODEL" "$GGUF" --tokenizer "$TOK_DIR" 2>&1 | tee -a "$LOG"
  cat "$GGUF" > /dev/null
  "$LLAMA_BENCH" -m "$GGUF" -p "$PROMPT" -n "$GEN" -t "$THREADS" -r 1 -o jsonl > "$OUT/llama_bench.jsonl" 2> "$OUT/llama_bench_err.txt" ||
    say "llama-bench failed: $(tail -2 "$OUT/llama_bench_err.txt")"
  cat "$OUT/llama_bench.jsonl" >> "$LOG"
  [ -n "${KEEP_GGUF:-}" ] || rm -f "$GGUF"
else
  say "SKIPPED: llama.cpp baseline: set LLAMA_BENCH to a llama-bench built from llama.cpp's source (CPU backend)"
fi

say "6. table"
python3 - "$LOG" "$OUT/dsv2_err.txt" "$OUT/llama_bench.jsonl" "$MODEL" "$PROMPT" "$GEN" "$THREADS" "$OUT/dsv2_plain_c_err.txt" <<'PY' | tee "$OUT/table.md"
import json, os, re, sys
sys.path.insert(0, "tools")
from convert_model import read_model
log, err, lj, model, prompt, gen, threads, plain_err = sys.argv[1:9]
prompt, gen = int(prompt), int(gen)
text = open(log).read()
bw = re.search(r"BENCH read_bandwidth GBps ([\d.]+)", text)
bw = float(bw.group(1)) if bw else None
speed = r"prompt: (\d+) tokens, ([\d.]+) tok/s; generated: (\d+) tokens, ([\d.]+) tok/s"
d = re.search(speed, open(err).read())
plain = re.search(speed, open(plain_err).read()) if os.path.exists(plain_err) else None
mem = re.search(r"memory: resident ([\d.]+) MiB \(peak ([\d.]+) MiB\); model file mapped: ([\d.]+) MiB", open(err).read())
llama = {}
if os.path.exists(lj):
    for line in open(lj):
        r = json.loads(line)
        llama["prompt" if r["n_prompt"] else "gen"] = r["avg_ts"]
# bytes one decode step reads: every tensor but the routed experts, K_r of those (mean size),
# one embedding row instead of the table, and the latent cache at the middle of the generation
h, dtype, tensors = read_model(model)
step = 0
for name, shape, tdtype, off, n in tensors:
    if ".mlp.experts." in name:
        step += n * h["n_experts_per_tok"] / h["n_routed_experts"]
    elif name == "model.embed_tokens.weight":
        step += n / shape[0]
    else:
        step += n
step += h["n_layers"] * (prompt + gen / 2) * (h["kv_lora_rank"] + h["qk_rope_head_dim"]) * 4
print(f"| measure | dsv2 | llama.cpp | dsv2 / llama.cpp | note |\n|---|---|---|---|---|")
print(f"| memory read bandwidth ({threads} threads) | {bw} GB/s | | | tools/read_bandwidth.c, 4 GB, best of 5 |")
if d:
    p_tps, g_tps = float(d.group(2)), float(d.group(4))
    lp, lg = llama.get("prompt"), llama.get("gen")
    show = lambda v, f: f.format(v) if v else "SKIPPED"
    ratio = lambda a, b: f"{a / b:.2f}x" if b else ""
    print(f"| prompt tok/s ({d.group(1)} tokens) | {p_tps:.2f} | {show(lp, '{:.2f}')} | {ratio(p_tps, lp)} | target >= 0.5x |")
    print(f"| decode tok/s ({d.group(3)} tokens after the prompt) | {g_tps:.2f} | {show(lg, '{:.2f}')} | {ratio(g_tps, lg)} | "
          "target >= 1.0x; llama-bench decodes from an empty cache |")
    gbps = g_tps * step / 1e9
    print(f"| decode GB/s ({step / 1e9:.2f} GB a token) | {gbps:.1f} | {show(lg and lg * step / 1e9, '{:.1f}')} | | "
          f"{f'{100 * gbps / bw:.0f}% of the read bandwidth (target 70%)' if bw else ''} |")
    if plain:
        print(f"| decode tok/s, dsv2 built with -DDSV2_PLAIN_C | {float(plain.group(4)):.2f} | | | "
              f"the AVX-512 q8 path is {g_tps / float(plain.group(4)):.2f}x this |")
else:
    print("| dsv2 | failed: see the log | | | |")
if mem:
    print(f"| dsv2 memory | resident {float(mem.group(1)) / 1024:.2f} GiB, peak {float(mem.group(2)) / 1024:.2f} GiB | | | "
          f"model file {float(mem.group(3)) / 1024:.2f} GiB mapped ({dtype}, {h['n_layers']} layers) |")
PY
say "done; log and outputs in $OUT/"
