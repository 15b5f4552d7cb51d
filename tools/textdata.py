"""Plain-text corpus files shared by the data, tokenizer and training scripts (stdlib only).

A corpus file is UTF-8 text holding whole documents separated by DOC_SEP (a line holding
only the ASCII record separator 0x1E). Documents never contain that byte. Byte counts
for bits per byte are the UTF-8 bytes of the documents themselves (separators excluded).
"""
import os

DOC_SEP = "\n\x1e\n"


def write_docs(path, docs):
    """Write documents to path; returns (n_docs, n_utf8_bytes of the documents)."""
    nbytes = 0
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for i, d in enumerate(docs):
            d = d.replace("\x1e", " ")
            if i:
                f.write(DOC_SEP)
            f.write(d)
            nbytes += len(d.encode("utf-8"))
    return len(docs), nbytes


def read_docs(path):
    with open(path, "r", encoding="utf-8", newline="\n") as f:
        text = f.read()
    return [d for d in text.split(DOC_SEP) if d.strip()]
