#!/usr/bin/env python3
"""Collect this interpreter's CPython standard library .py sources as training text.

Runs on the GPU machine (no network needed): python3 tools/prep_code.py --out data
Skips tests (test/, tests/, idle_test/), site-packages, __pycache__, generated tables
(encodings/, pydoc_data/) and files over --max-file-bytes. Holds out ~3% by file
(a stable hash of the relative path). Writes data/code_train.txt, data/code_val.txt and
data/code_stats.json (Python version, file counts, bytes). License: PSF License.
"""
import argparse
import hashlib
import json
import os
import sys
import sysconfig

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from textdata import write_docs  # noqa: E402

SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__",
             "encodings", "pydoc_data", "lib2to3", "turtledemo", "ensurepip"}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="data")
    ap.add_argument("--max-file-bytes", type=int, default=200_000)
    ap.add_argument("--max-total-bytes", type=int, default=0, help="0 = no cap (smoke uses a cap)")
    ap.add_argument("--val-mod", type=int, default=33, help="hold out files whose hash %% mod == 0")
    a = ap.parse_args()
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
    with open(os.path.join(a.out, "code_stats.json"), "w") as f:
        json.dump(stats, f, indent=1)
    print(json.dumps({k: v for k, v in stats.items() if k != "val"}), "val files", nv, "bytes", bv)


if __name__ == "__main__":
    main()
