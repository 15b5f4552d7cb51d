#!/usr/bin/env python3
"""Two default models on the same validation texts (GPU machine: torch, transformers).

  python3 tools/compare_val.py --old-bin dsv2_tiny.bin --old-tok tokenizer.bin --new-hf RUN/hf \
      --text english=data/english_val.txt --text code=data/code_val.txt ... --out RUN/compare_val.json

Used after a retraining, when filtering the data changed the validation text: the old model
(the committed dsv2_tiny.bin) and the new one (RUN/hf) are evaluated on each text exactly as
tools/train.py's final validation does (documents as BOS + text + EOS, windows of ctx+1
tokens overlapping by one, every token after the first predicted once, bf16 weights, bf16
autocast; bits per byte over the UTF-8 bytes the windows cover).
- The old model is read back from its dsv2 file (docs/FORMAT.md; export.py's tensor order)
  into a hub-layout directory; its header must equal the one export.py would write for the
  new model's config.json (same architecture and RoPE).
- The old tokenizer exists only as tokenizer.bin: its ids come from `./dsv2 -m encode`
  (dsv2.c's tokenizer, checked against Hugging Face tokenizers by test_all.c) on the
  documents joined by the EOS and BOS tokens' text, which dsv2.c splits off as special tokens.
"""
import argparse
import json
import math
import os
import shutil
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dsv2_hf as H  # noqa: E402
import export  # noqa: E402  (the repository's export.py: header and tensor order)
import train as TR  # noqa: E402
from textdata import read_docs  # noqa: E402

BOS_TEXT, EOS_TEXT = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"


def bin_to_hf(bin_path, like_hf, outdir):
    """dsv2 file -> hub-layout HF directory (config and tokenizer files copied from like_hf)."""
    h = export.read_config(like_hf)
    with open(bin_path, "rb") as f:
        raw = f.read()
    if raw[:export.HEADER_BYTES] != export.pack_header(h, "bf16"):
        raise SystemExit(f"{bin_path}: header differs from export.py's for {like_hf}/config.json")
    sd, off = {}, export.HEADER_BYTES
    for name, shape in export.tensor_names(h):
        off += -off % export.ALIGN
        n = math.prod(shape)
        sd[name] = torch.frombuffer(bytearray(raw[off:off + 2 * n]), dtype=torch.bfloat16).reshape(shape).clone()
        off += 2 * n
    if off != len(raw):
        raise SystemExit(f"{bin_path}: {len(raw)} bytes, the tensors end at {off}")
    from safetensors.torch import save_file
    os.makedirs(outdir, exist_ok=True)
    save_file(sd, os.path.join(outdir, "model.safetensors"), metadata={"format": "pt"})
    for n in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(like_hf, n), os.path.join(outdir, n))
    return outdir


def stream_hf(docs, tok):
    ids = []
    for e in tok.tok.encode_batch(docs, add_special_tokens=False):
        ids += [tok.bos] + e.ids + [tok.eos]
    return ids


def stream_bin(docs, dsv2, tok_bin, tmp):
    """BOS doc EOS BOS doc EOS ... with dsv2.c's tokenizer (it prepends the BOS itself)."""
    with open(tmp, "w", encoding="utf-8") as f:
        f.write((EOS_TEXT + BOS_TEXT).join(docs) + EOS_TEXT)
    r = subprocess.run([dsv2, "-m", "encode", "-z", tok_bin, "-f", tmp], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{dsv2} -m encode failed: {r.stderr.strip()}")
    return [int(x) for x in r.stdout.split()]


def evaluate(model, hub_cfg, ids, nbytes, ctxs):
    s = {"ids": torch.tensor(ids, dtype=torch.int32)}
    cap = H.RouterCapture(model, hub_cfg)
    out = {}
    for T in ctxs:
        w = TR.val_windows(s, T)
        loss, nats, n = TR.evaluate(model, w, cap, bs=max(1, 64 * 256 // T))
        covered = nbytes * n / (len(ids) - 1)
        out[f"ctx{T}"] = {"loss": loss, "tokens": n, "bits_per_byte": nats / math.log(2) / covered}
    cap.remove()
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--old-bin", required=True, help="the old model's dsv2 file (bf16)")
    ap.add_argument("--old-tok", required=True, help="the old model's tokenizer.bin")
    ap.add_argument("--new-hf", required=True, help="the new model's HF directory")
    ap.add_argument("--dsv2", default="./dsv2", help="dsv2 binary, for -m encode")
    ap.add_argument("--text", action="append", required=True, help="NAME=PATH of a corpus file (textdata format)")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    hub = json.load(open(os.path.join(a.new_hf, "config.json")))
    work = os.path.dirname(os.path.abspath(a.out))
    old_dir = bin_to_hf(a.old_bin, a.new_hf, os.path.join(work, "old_hf"))
    new_tok = H.RawTokenizer(os.path.join(a.new_hf, "tokenizer.json"))
    ctxs = (256, hub["max_position_embeddings"])
    res = {"note": __doc__.strip().split("\n\n")[1], "texts": {}}
    for which, d in (("old", old_dir), ("new", a.new_hf)):
        model, rep, info = H.load_hf_dir(d, torch.float32)
        model = model.cuda().eval()
        res[f"{which}_loading"] = {"rope_report": rep, "info": info}
        for spec in a.text:
            name, path = spec.split("=", 1)
            docs = read_docs(path)
            nbytes = sum(len(x.encode("utf-8")) for x in docs)
            if which == "old":
                ids = stream_bin(docs, a.dsv2, a.old_tok, os.path.join(work, "compare_tmp.txt"))
            else:
                ids = stream_hf(docs, new_tok)
            r = res["texts"].setdefault(name, {"path": path, "docs": len(docs), "bytes": nbytes})
            r[which] = {"tokens": len(ids), **evaluate(model, hub, ids, nbytes, ctxs)}
            print(which, name, json.dumps(r[which]), flush=True)
        del model
        torch.cuda.empty_cache()
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
