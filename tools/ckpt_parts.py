#!/usr/bin/env python3
"""Move a resume checkpoint through the GPU machine's $OUT (files <= 16 MiB each).

  python3 tools/ckpt_parts.py split CKPT_DIR DEST_DIR   # model.pt -> model_part0.pt, model_part1.pt (+ state.json)
  python3 tools/ckpt_parts.py merge CKPT_DIR            # model_part*.pt -> model.pt (train.py does this itself)

Only the fp32 weights and state.json travel (2 x ~15.6 MB); the AdamW state (~62 MB) does
not: a resumed run restarts the optimizer with a short warmup and continues the
wall-clock cosine schedule from state.json.
"""
import glob
import os
import shutil
import sys


def split(ckdir, dest, parts=2):
    import torch
    sd = torch.load(os.path.join(ckdir, "model.pt"), map_location="cpu")
    os.makedirs(dest, exist_ok=True)
    keys = sorted(sd, key=lambda k: -sd[k].numel())
    buckets, sizes = [{} for _ in range(parts)], [0] * parts
    for k in keys:  # greedy balance by size
        i = sizes.index(min(sizes))
        buckets[i][k] = sd[k]
        sizes[i] += sd[k].numel() * sd[k].element_size()
    for i, b in enumerate(buckets):
        torch.save(b, os.path.join(dest, f"model_part{i}.pt"))
    shutil.copy(os.path.join(ckdir, "state.json"), os.path.join(dest, "state.json"))
    print("split", [round(s / 2**20, 2) for s in sizes], "MiB")


def merge(ckdir):
    ps = sorted(glob.glob(os.path.join(ckdir, "model_part*.pt")))
    if not ps or os.path.exists(os.path.join(ckdir, "model.pt")):
        return False
    import torch
    sd = {}
    for p in ps:
        sd.update(torch.load(p, map_location="cpu"))
    torch.save(sd, os.path.join(ckdir, "model.pt"))
    for p in ps:
        os.remove(p)
    print("merged", len(ps), "checkpoint parts")
    return True


if __name__ == "__main__":
    if sys.argv[1] == "split":
        split(sys.argv[2], sys.argv[3])
    else:
        merge(sys.argv[2])
