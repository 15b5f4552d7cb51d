#!/usr/bin/env bash
# Driver for the GPU machine (one H100, no internet). From the repository root:
#
#   bash tools/run_training.sh smoke  OUTDIR   # whole pipeline on a sliver of data, ~1-2 min
#   bash tools/run_training.sh full   OUTDIR   # prep + tokenizer + train + finish, one <10-min call
#   bash tools/run_training.sh prep   OUTDIR   # code data + tokenizer only
#   bash tools/run_training.sh train  OUTDIR   # train (resumes from OUTDIR/ckpt) + finish
#   bash tools/run_training.sh finish OUTDIR   # golden files, plots, collect (after a finished train)
#
# Needs (carried, gitignored): data/english_{train,val}.txt (+ *_stats.json) and
# data/wordlist_en.json from tools/get_data.sh, and .cache/deepseek-v2-tokenizer.json (a copy
# of DeepSeek-V2's tokenizer.json; only its pre_tokenizer is used). Env: TRAIN_BUDGET (s,
# default 360), DEADLINE (s after train.py starts, default 480), PRETOK (path of that
# tokenizer.json).
# `full` then compares the new model with the committed one (dsv2_tiny.bin) on the same
# validation texts, filtered and (data/unfiltered/, from get_data.sh) unfiltered:
# tools/compare_val.py, non-fatal, into compare_val.json.
# Results for $OUT (<= 8 files, <= 16 MiB each): hf/{config.json, model.safetensors,
# tokenizer.json, tokenizer_config.json}, loss_curves.png, expert_load.png, results.tar.gz
# (metrics.json, train_log.csv, samples.txt, golden/, compare_val.json, data stats, logs).
# If training stops at the
# deadline (exit 3), $OUT gets resume/{model_part0.pt, model_part1.pt, state.json,
# tokenizer.json, tokenizer_config.json} instead: copy that folder to OUTDIR/ckpt-carry
# here (see docs/MODEL.md, "Reproducing") and run `train` again.
set -euo pipefail
cd "$(dirname "$0")/.."
STAGE=${1:?stage: smoke|full|prep|train|finish}
O=${2:-.cache/run}
PRETOK=${PRETOK:-.cache/deepseek-v2-tokenizer.json}
TRAIN_BUDGET=${TRAIN_BUDGET:-360}
DEADLINE=${DEADLINE:-480}
PY=${PY:-python3}
COLLECT=${OUT:-$O/collect}
mkdir -p "$O" "$COLLECT"
exec > >(tee -a "$O/run_$STAGE.log") 2>&1
echo "== $STAGE into $O ($(date -u +%FT%TZ)); results to $COLLECT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true

need() { [ -f "$1" ] || { echo "missing $1 ($2)"; exit 2; }; }

restore_carry() {  # a resume folder that came back through $OUT and was carried in again
  local c=$O/ckpt-carry
  if [ -d "$c" ]; then
    mkdir -p "$O/ckpt" "$O/tokenizer"
    cp "$c"/model_part*.pt "$c"/state.json "$O/ckpt/" 2>/dev/null || true
    cp "$c"/tokenizer.json "$c"/tokenizer_config.json "$O/tokenizer/" 2>/dev/null || true
    cp "$c"/metrics.json "$c"/train_log.csv "$O/" 2>/dev/null || true
    rm -rf "$c"
  fi
}

prep() {  # $1 = data dir, $2 = tokenizer dir, $3 = extra args for prep_code, $4 = tokenizer max bytes
  need data/english_train.txt "run tools/get_data.sh on the dev machine and carry data/"
  need data/wordlist_en.json "run tools/get_data.sh on the dev machine and carry data/"
  need "$PRETOK" "copy DeepSeek-V2's tokenizer.json there and carry it"
  if [ ! -f "$1/code_train.txt" ]; then $PY tools/prep_code.py --out "$1" --words data/wordlist_en.json $3; fi
  if [ "$1" != data ]; then cp data/english_*.txt data/english_stats.json "$1/" 2>/dev/null || true; fi
  if [ ! -f "$2/tokenizer.json" ]; then
    $PY tools/train_tokenizer.py --pretok-from "$PRETOK" --data "$1" --out "$2" --max-bytes "$4"
  fi
}

collect() {  # $1 = run dir
  local r=$1
  mkdir -p "$COLLECT/hf"
  cp "$r/hf/config.json" "$r/hf/model.safetensors" "$r/hf/tokenizer.json" "$r/hf/tokenizer_config.json" "$COLLECT/hf/"
  cp "$r/loss_curves.png" "$r/expert_load.png" "$COLLECT/" 2>/dev/null || true
  cp data/english_stats.json data/code_stats.json "$r/" 2>/dev/null || true
  (cd "$r" && tar -czf "$COLLECT/results.tar.gz" metrics.json train_log.csv samples.txt golden golden_txt \
      tokenizer/tokenizer_stats.json english_stats.json code_stats.json compare_val.json run_*.log 2>/dev/null || true)
  ls -la "$COLLECT" "$COLLECT/hf"
}

finish() {  # $1 = run dir
  $PY tools/model_golden.py "$1/hf" "$1/golden"
  $PY tools/golden_to_txt.py "$1/golden" "$1/golden_txt"
  $PY tools/plots.py "$1" || echo "plots failed (non-fatal)"
  collect "$1"
}

compare() {  # $1 = run dir: the committed model vs the new one on the same validation texts
  local r=$1 texts=(--text english=data/english_val.txt --text code=data/code_val.txt)
  [ -f dsv2_tiny.bin ] && [ -f tokenizer.bin ] || { echo "no committed model to compare with"; return 0; }
  make dsv2 >/dev/null
  if [ -f data/unfiltered/english_val.txt ]; then
    texts+=(--text english_unfiltered=data/unfiltered/english_val.txt)
    $PY tools/prep_code.py --out "$r/unfiltered" >/dev/null && texts+=(--text code_unfiltered="$r/unfiltered/code_val.txt")
  fi
  $PY tools/compare_val.py --old-bin dsv2_tiny.bin --old-tok tokenizer.bin --new-hf "$r/hf" "${texts[@]}" \
      --out "$r/compare_val.json"
  collect "$r"
}

train() {  # $1 = data dir, $2 = run dir, rest = extra train.py args
  local d=$1 r=$2; shift 2
  set +e
  $PY tools/train.py --data "$d" --tok "$r/tokenizer" --out "$r" "$@"
  local rc=$?
  set -e
  if [ $rc -eq 3 ]; then
    echo "training stopped at the deadline: returning a resume checkpoint"
    $PY tools/ckpt_parts.py split "$r/ckpt" "$COLLECT/resume"
    cp "$r/tokenizer/tokenizer.json" "$r/tokenizer/tokenizer_config.json" "$COLLECT/resume/"
    cp "$r/metrics.json" "$r/train_log.csv" "$COLLECT/resume/" 2>/dev/null || true
    exit 3
  fi
  [ $rc -eq 0 ] || exit $rc
}

case $STAGE in
  smoke)
    S=$O/smoke
    mkdir -p "$S"
    prep "$S/data" "$S/tokenizer" "--max-total-bytes 3000000" 4000000
    train "$S/data" "$S" --smoke
    finish "$S"
    ;;
  prep)
    prep data "$O/tokenizer" "" 16000000
    ;;
  full)
    restore_carry
    prep data "$O/tokenizer" "" 16000000
    train data "$O" --time-budget "$TRAIN_BUDGET" --deadline "$DEADLINE"
    finish "$O"
    compare "$O" || echo "compare failed (non-fatal)"
    ;;
  train)
    restore_carry
    prep data "$O/tokenizer" "" 16000000
    train data "$O" --time-budget "$TRAIN_BUDGET" --deadline "$DEADLINE"
    finish "$O"
    ;;
  finish)
    finish "$O"
    ;;
  *) echo "unknown stage $STAGE"; exit 2 ;;
esac
echo "== $STAGE done ($(date -u +%FT%TZ))"
