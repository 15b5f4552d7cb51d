#!/usr/bin/env bash
# dsv2cu under compute-sanitizer: memcheck (out-of-bounds and misaligned accesses), racecheck
# (shared-memory races) and synccheck (barriers in divergent code), each on a short prompt
# (the batched prefill) plus a few generated tokens (the decode graph) of every model below.
# Fails (exit 1) on any report. Needs a GPU, ./dsv2cu and the fixtures (`make dsv2cu
# build/fixtures/lite.bf16.bin ...`; tools/bench_cuda.sh builds them and calls this script).
# The models run in parallel (one process each; about 50 s in all on an H200, racecheck the
# slowest). Logs: $SANITIZE_LOGS (default build/sanitize)/<model>_<tool>.log. Arguments (lite,
# v2, default) pick models.
#
# The prompts reach every path of the attention: the fixtures' (about 54 tokens, context 128-256)
# give one split in the prefill and two in the decode; the default model's (452 tokens) gives
# four 128-query prefill launches of up to two 256-row splits, and 15 splits in the decode.
set -uo pipefail
LOGS=${SANITIZE_LOGS:-build/sanitize}
BIN=${BIN:-./dsv2cu}
LIMIT=${SANITIZE_TIMEOUT:-300}  # seconds per sanitizer run
mkdir -p "$LOGS"
if ! command -v compute-sanitizer >/dev/null; then
    echo "SKIPPED: compute-sanitizer not found (install the CUDA toolkit's sanitizer to run this)"; exit 0
fi
short=$(printf 'Hello world, this is a test. %.0s' 1 2 3)
long=$(printf 'The jury said that the city council had approved the plan. %.0s' $(seq 30))
runs=("lite build/fixtures/lite.bf16.bin build/fixtures/lite.tok.bin short"
      "v2 build/fixtures/v2.bf16.bin build/fixtures/v2.tok.bin short"
      "default dsv2_tiny.bin tokenizer.bin long")

# the three tools on one model, one after the other; one OK / NOT OK line each
sanitize_model() {
    local name=$1 model=$2 tok=$3 prompt=$4 tool log t0 rc summary clean
    for tool in memcheck racecheck synccheck; do
        log="$LOGS/${name}_${tool}.log"
        t0=$(date +%s)
        timeout "$LIMIT" compute-sanitizer --tool "$tool" --error-exitcode 99 "$BIN" "$model" -z "$tok" -t 0 -n 6 \
            -i "$prompt" >"$log" 2>&1
        rc=$?
        # memcheck/synccheck: "ERROR SUMMARY: N errors"; racecheck: "RACECHECK SUMMARY: N hazards displayed"
        summary=$(grep -E "(ERROR|RACECHECK) SUMMARY" "$log" | tr -s ' =' ' ' | paste -sd ';' -)
        clean="ERROR SUMMARY: 0 errors"; [ "$tool" = racecheck ] && clean="RACECHECK SUMMARY: 0 hazards"
        if [ $rc -eq 0 ] && grep -q "$clean" "$log" && ! grep -qE "(ERROR|RACECHECK) SUMMARY: [1-9]" "$log"; then
            echo "OK     sanitize $name $tool ($(( $(date +%s) - t0 )) s):$summary"
        else
            echo "NOT OK sanitize $name $tool (exit $rc, $(( $(date +%s) - t0 )) s):$summary; log $log; first reports:"
            grep -m 12 -E "^========= (Invalid|Error|Race|Barrier|  +at|    by|Address|Saved)|(Warning|Error): .*hazard" "$log" | sed 's/^/    /'
        fi
    done
}

only=" $* "
names=()
for run in "${runs[@]}"; do
    read -r name model tok which <<<"$run"
    [ $# -gt 0 ] && [[ "$only" != *" $name "* ]] && continue
    prompt=$short; [ "$which" = long ] && prompt=$long
    sanitize_model "$name" "$model" "$tok" "$prompt" >"$LOGS/$name.txt" 2>&1 &
    names+=("$name")
done
wait
files=()
for name in "${names[@]}"; do files+=("$LOGS/$name.txt"); done
cat "${files[@]}"
ok=$(cat "${files[@]}" | grep -c "^OK ")
n_runs=$(( ${#names[@]} * 3 ))
echo "sanitize: $((n_runs - ok)) of $n_runs runs reported problems or did not finish"
[ "$ok" -eq "$n_runs" ]
