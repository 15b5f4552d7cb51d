#!/usr/bin/env bash
# The economy experiment (issue 13 item 5), one call on the GPU machine (repo root as cwd):
# aggregate decode tok/s of dsv2cu over a batch of sequences, with the latent cache (MLA, what the
# model stores) and with the expanded cache (--kv-layout mha: every head's key and value, what a
# model without MLA would store), under one fixed cache budget, at contexts 2K and 8K, on two shapes:
#   v2-lite   DeepSeek-V2-Lite's shape (27 layers, 16 heads, 64 experts), random bf16 weights
#   v2-attn   DeepSeek-V2's attention (128 heads, q_lora_rank 1536, kv_lora_rank 512, rope 64, nope 128,
#             v 128, hidden 5120) with 4 layers and 16 routed experts, so that it fits on one GPU
# plus transformers' batched generate on the v2-lite shape, the baseline a user already has.
# Prints a table for docs/BENCHMARKS.md and writes $OUT/serving.csv and $OUT/serving.png.
#   BUDGET  cache budget in GiB (default 40); STEPS  decode steps timed per point (default 10)
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-bench_out}
BUDGET=${BUDGET:-40}
STEPS=${STEPS:-10}
mkdir -p "$OUT" build
LOG="$OUT/serving.log"
t_start=$(date +%s)
say() { echo "== [$(( $(date +%s) - t_start ))s] $*" | tee -a "$LOG"; }
step() { local t=$1; shift; timeout "$t" "$@" 2>&1 | tee -a "$LOG"; local rc=${PIPESTATUS[0]}; [ $rc -ne 0 ] && say "step failed or timed out (rc $rc): $*"; return 0; }

say "GPU: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1)"
say "1. build dsv2cu; the random models (in the background)"
[ -f build/v2lite_random.bin ] || python3 tools/make_random_model.py build/v2lite_random.bin --config-out build/v2lite_cfg > "$OUT/model1.log" 2>&1 &
p1=$!
python3 - <<'PY'
import json, sys
sys.path.insert(0, "tools")
import make_random_model as r
cfg = dict(r.V2, num_hidden_layers=4, n_routed_experts=16)
json.dump(cfg, open("build/v2attn_config.json", "w"), indent=1)
PY
[ -f build/v2attn_random.bin ] || python3 tools/make_random_model.py build/v2attn_random.bin --config build/v2attn_config.json > "$OUT/model2.log" 2>&1 &
p2=$!
step 240 make -j16 dsv2cu
wait $p1 $p2
say "models: $(ls -la build/v2lite_random.bin build/v2attn_random.bin 2>&1 | awk '{print $5, $9}' | tr '\n' ' ')"

serve() {  # shape model ctx layout batches: the BENCH serve lines tagged with the shape
    timeout 150 ./dsv2cu --bench-serve "$2" --ctx "$3" --batch "$5" --kv bf16 --kv-layout "$4" --kv-mem "$BUDGET" \
        --steps "$STEPS" 2>&1 | sed -u "s/^BENCH serve /BENCH serve shape $1 /" | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}; [ $rc -ne 0 ] && say "step failed or timed out (rc $rc): --bench-serve $*"; return 0
}
say "2. dsv2cu --bench-serve, bf16 cache, budget $BUDGET GiB"
serve v2-lite build/v2lite_random.bin 2048 latent 1,4,16,64,256,max
serve v2-lite build/v2lite_random.bin 2048 mha 1,4,16,max
serve v2-lite build/v2lite_random.bin 8192 latent 1,4,16,64,max
serve v2-lite build/v2lite_random.bin 8192 mha 1,4,max
serve v2-attn build/v2attn_random.bin 2048 latent 1,4,16,64,256,max
serve v2-attn build/v2attn_random.bin 2048 mha 1,4,16,max
serve v2-attn build/v2attn_random.bin 8192 latent 1,4,16,64,max
serve v2-attn build/v2attn_random.bin 8192 mha 1,4,max
say "3. transformers $(python3 -c 'import transformers; print(transformers.__version__)' 2>&1) batched generate, v2-lite shape"
step ${HF_SECONDS:-200} python3 tools/bench_hf_serve.py build/v2lite_cfg --ctx 2048 8192 --batch 1 4 16 64 --budget-s $(( ${HF_SECONDS:-200} - 20 ))
say "4. table"
python3 - "$LOG" "$OUT" "$(date -u +%Y-%m-%d)" "$BUDGET" <<'PY' | tee "$OUT/serving_table.md"
import re, sys, csv
log, out, day, budget = open(sys.argv[1]).read(), sys.argv[2], sys.argv[3], sys.argv[4]
dev = re.search(r"BENCH device (.+)", log)
bw = re.findall(r"copy_bandwidth_GBps ([\d.]+)", log)
pts = [dict(zip(("shape", "layout", "kv", "ctx", "batch", "ms", "tps", "cache", "weights", "experts", "roof_ms", "roof", "fit"), m))
       for m in re.findall(r"BENCH serve shape (\S+) layout (\S+) kv (\S+) ctx (\d+) batch (\d+) step_ms ([\d.]+) tok_per_s ([\d.]+) "
                           r"cache_bytes ([\d.]+) weight_bytes ([\d.]+) experts_touched ([\d.]+) roofline_ms ([\d.]+) "
                           r"roofline_fraction ([\d.]+) max_batch_fit (\d+)", log)]
hf = re.findall(r"BENCH hf_serve ctx (\d+) batch (\d+) tok_per_s ([\d.]+)", log)
print(f"### {dev.group(1) if dev else '?'}, {day}: `tools/bench_serving.sh` (bf16 cache, budget {budget} GiB)\n")
print(f"Copy bandwidth measured in each dsv2cu process: {', '.join(sorted(set(bw))) or '?'} GB/s.\n")
print("| shape | context | layout | batch | step ms | tok/s | cache GB read | weights GB | roofline ms | of roofline | largest batch in budget |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
for p in pts:
    print(f"| {p['shape']} | {p['ctx']} | {p['layout']} | {p['batch']} | {float(p['ms']):.2f} | {float(p['tps']):.0f} | "
          f"{float(p['cache'])/1e9:.2f} | {float(p['weights'])/1e9:.2f} | {float(p['roof_ms']):.2f} | {100*float(p['roof']):.0f}% | {p['fit']} |")
for c, b, t in hf:
    print(f"| v2-lite | {c} | transformers generate | {b} | | {float(t):.0f} | | | | | |")
print("\n| shape | context | latent: best tok/s (batch) | mha: best tok/s (batch) | ratio | cache per token, latent / mha |")
print("|---|---|---|---|---|---|")
rows = []
for shape in sorted({p["shape"] for p in pts}):
    for ctx in sorted({int(p["ctx"]) for p in pts if p["shape"] == shape}):
        best = {}
        per_tok = {}
        for lay in ("latent", "mha"):
            q = [p for p in pts if p["shape"] == shape and int(p["ctx"]) == ctx and p["layout"] == lay]
            if q:
                b = max(q, key=lambda p: float(p["tps"]))
                best[lay] = b
                per_tok[lay] = float(b["cache"]) / (int(b["batch"]) * ctx)
            for p in q:
                rows.append({"shape": shape, "ctx": ctx, "system": lay, "batch": p["batch"], "tok_per_s": p["tps"], "max_batch": p["fit"]})
        if len(best) == 2:
            r = float(best["latent"]["tps"]) / float(best["mha"]["tps"])
            print(f"| {shape} | {ctx} | {float(best['latent']['tps']):.0f} ({best['latent']['batch']}) | "
                  f"{float(best['mha']['tps']):.0f} ({best['mha']['batch']}) | {r:.2f}x | "
                  f"{per_tok['latent']:.0f} / {per_tok['mha']:.0f} bytes ({100 * (1 - per_tok['latent'] / per_tok['mha']):.1f}% less) |")
for c, b, t in hf:
    rows.append({"shape": "v2-lite", "ctx": int(c), "system": "transformers", "batch": b, "tok_per_s": t, "max_batch": ""})
with open(f"{out}/serving.csv", "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=["shape", "ctx", "system", "batch", "tok_per_s", "max_batch"])
    w.writeheader()
    w.writerows(rows)
PY
step 60 python3 tools/plot_serving.py "$OUT/serving.csv" "$OUT/serving.png"
say "done"
