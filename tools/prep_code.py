#!/usr/bin/env python3
"""Collect this interpreter's CPython standard library .py sources as training text.

Runs on the GPU machine (no network needed): python3 tools/prep_code.py --out data
Skips tests (test/, tests/, idle_test/), site-packages, __pycache__, generated tables
(encodings/, pydoc_data/) and files over --max-file-bytes. Holds out ~3% by file
(a stable hash of the relative path). Writes data/code_train.txt, data/code_val.txt and
data/code_stats.json (Python version, file counts, bytes). License: PSF License.
Classroom-safe filter (--words, tools/wordlist.py): in source code the words are in the
comments and docstrings, so a comment holding a listed word is removed (its whole line if
nothing else is on it), and so is every such line inside a docstring; code and other string
literals are left as they are (removing them would break the program): what the list still
finds there is counted in the stats (placeholders like '%xx', 'cum' for cumulative).
"""
import argparse
import hashlib
import io
import json
import os
import sys
import sysconfig
import tokenize

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from textdata import write_docs  # noqa: E402
from wordlist import PACKAGE, WordList  # noqa: E402

SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__",
             "encodings", "pydoc_data", "lib2to3", "turtledemo", "ensurepip"}


def strip_listed(txt, wl):
    """(source without the comments and docstring lines that hold a listed word,
    comments removed, docstring lines removed); the source as it is if it does not tokenize."""
    if not wl.hits(txt):
        return txt, 0, 0
    try:
        toks = list(tokenize.generate_tokens(io.StringIO(txt).readline))
    except (tokenize.TokenError, SyntaxError):
        return txt, 0, 0
    lines = txt.split("\n")
    cut, drop = {}, set()  # line -> column where its comment starts; docstring lines
    prev = tokenize.NEWLINE
    for i, t in enumerate(toks):
        if t.type == tokenize.COMMENT and wl.hits(t.string):
            cut[t.start[0]] = t.start[1]
        # a docstring: a string that is a statement of its own; its inner lines can go
        if (t.type == tokenize.STRING and prev in (tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT)
                and toks[i + 1].type in (tokenize.NEWLINE, tokenize.COMMENT)):
            drop.update(r for r in range(t.start[0] + 1, t.end[0]) if wl.hits(lines[r - 1]))
        if t.type not in (tokenize.COMMENT, tokenize.NL):
            prev = t.type
    out = []
    for r, line in enumerate(lines, 1):
        if r in drop:
            continue
        if r in cut:
            line = line[:cut[r]].rstrip()
            if not line.strip():
                continue
        out.append(line)
    return "\n".join(out), len(cut), len(drop)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="data")
    ap.add_argument("--max-file-bytes", type=int, default=200_000)
    ap.add_argument("--max-total-bytes", type=int, default=0, help="0 = no cap (smoke uses a cap)")
    ap.add_argument("--val-mod", type=int, default=33, help="hold out files whose hash %% mod == 0")
    ap.add_argument("--words", help=f"en.json of {PACKAGE}: remove comments/docstring lines holding a listed word")
    a = ap.parse_args()
    wl = WordList(a.words) if a.words else None
    flt = {"comments_removed": 0, "docstring_lines_removed": 0, "bytes_removed": 0, "files_changed": 0,
           "left_in_code_and_strings": {}}
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for d, dirs, names in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x not in SKIP_DIRS and not x.startswith("."))
        for n in sorted(names):
            if n.endswith(".py"):
                files.append(os.path.join(d, n))
    files.sort()
    train, val, tv = [], [], []
    total, skipped = 0, 0
    for p in files:
        rel = os.path.relpath(p, root).replace(os.sep, "/")
        try:
            raw = open(p, "rb").read()
            txt = raw.decode("utf-8")
        except (OSError, UnicodeDecodeError):
            skipped += 1
            continue
        if len(raw) > a.max_file_bytes or not txt.strip():
            skipped += 1
            continue
        txt = txt.replace("\r\n", "\n").replace("\x1e", " ")
        if a.max_total_bytes and total + len(raw) > a.max_total_bytes:
            break
        total += len(raw)
        if wl:
            new, n_comments, n_doc = strip_listed(txt, wl)
            if new != txt:
                flt["files_changed"] += 1
                flt["comments_removed"] += n_comments
                flt["docstring_lines_removed"] += n_doc
                flt["bytes_removed"] += len(txt.encode("utf-8")) - len(new.encode("utf-8"))
                txt = new
            for h in wl.hits(txt):
                left = flt["left_in_code_and_strings"].setdefault(h, [])
                if rel not in left:
                    left.append(rel)
        h = int(hashlib.sha1(rel.encode()).hexdigest(), 16)
        if h % a.val_mod == 0:
            val.append(txt)
            tv.append(rel)
        else:
            train.append(txt)
    nt, bt = write_docs(os.path.join(a.out, "code_train.txt"), train)
    nv, bv = write_docs(os.path.join(a.out, "code_val.txt"), val)
    stats = {"python": sys.version, "stdlib": root, "license": "PSF License (Python Software Foundation License Version 2)",
             "train": {"files": nt, "bytes": bt}, "val": {"files": nv, "bytes": bv, "held_out": tv},
             "skipped": skipped}
    if wl:
        stats["filter"] = {"list": PACKAGE, "rule": "tools/prep_code.py strip_listed", **flt}
    with open(os.path.join(a.out, "code_stats.json"), "w") as f:
        json.dump(stats, f, indent=1)
    print(json.dumps({k: v for k, v in stats.items() if k != "val"}), "val files", nv, "bytes", bv)


if __name__ == "__main__":
    main()
