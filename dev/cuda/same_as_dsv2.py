#!/usr/bin/env python3
"""Checks that every block of dev/cuda/mla_attention.cu marked '>>> verbatim from dsv2_mla.cuh' appears,
character for character, in dsv2_mla.cuh: version 5 must stay the kernel that dsv2.cu runs. Version 6 is
not copied: the file must include dsv2_mla_decode.cuh (the batch engine's kernels) itself."""
import argparse
import os
import sys

START = "// >>> verbatim from dsv2_mla.cuh"
END = "// <<< end of the verbatim copy"


def blocks(text):
    """the text between each START line and the next END line"""
    out, pos = [], 0
    while (i := text.find(START, pos)) >= 0:
        body = text.index("\n", i) + 1
        j = text.index(END, body)
        out.append(text[body:j])
        pos = j + len(END)
    return out


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dev", default=os.path.join(here, "mla_attention.cu"), help="the dev/cuda file")
    ap.add_argument("--main", default=os.path.join(here, "..", "..", "dsv2_mla.cuh"), help="dsv2.cu's MLA header")
    args = ap.parse_args()
    main_text = open(args.main).read()
    found = blocks(open(args.dev).read())
    bad = [b for b in found if b not in main_text]
    for b in bad:
        first = next((l for l in b.splitlines() if l.strip()), "")
        print(f"same_as_dsv2.py: a verbatim block of {args.dev} is not in {args.main} (it starts: {first[:80]!r})")
    if not found:
        print(f"same_as_dsv2.py: no verbatim blocks in {args.dev}")
    print(f"{'OK    ' if found and not bad else 'NOT OK'} dev/cuda version 5 is dsv2_mla.cuh's kernel: "
          f"{len(found) - len(bad)}/{len(found)} verbatim blocks found in {os.path.basename(args.main)}")
    included = '#include "../../dsv2_mla_decode.cuh"' in open(args.dev).read()
    print(f"{'OK    ' if included else 'NOT OK'} dev/cuda versions 6 and 7 are dsv2_mla_decode.cuh's kernels: "
          f"{'included' if included else 'the include of ../../dsv2_mla_decode.cuh is missing'}")
    sys.exit(0 if found and not bad and included else 1)


if __name__ == "__main__":
    main()
